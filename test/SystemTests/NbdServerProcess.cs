using System.Diagnostics;
using System.Text;
using System.Text.RegularExpressions;

namespace NbdServer.SystemTests;

/// <summary>
/// A real <c>nbd-server</c> process on a free loopback port (it binds 127.0.0.1:0 and we read the
/// port from its "Serving NBD on …" line). Disposing kills it; its log is kept for assertions.
/// </summary>
internal sealed partial class NbdServerProcess : IDisposable
{
    private readonly Process _process;
    private readonly StringBuilder _log = new();
    private readonly TaskCompletionSource<int> _port = new(TaskCreationOptions.RunContinuationsAsynchronously);

    private NbdServerProcess(Process process) => _process = process;

    public int Port => _port.Task.Result;

    public int ProcessId => _process.Id;

    public string Uri(string export = "vol0") => $"nbd://127.0.0.1:{Port}/{export}";

    public string Log
    {
        get
        {
            lock (_log)
            {
                return _log.ToString();
            }
        }
    }

    public bool HasExited => _process.HasExited;

    /// <summary>Starts <c>nbd-server</c> with <paramref name="args"/> plus <c>--listen 127.0.0.1:0</c>.</summary>
    public static async Task<NbdServerProcess> StartAsync(params string[] args)
    {
        string dll = Path.Combine(AppContext.BaseDirectory, "nbd-server.dll");
        var info = new ProcessStartInfo("dotnet")
        {
            RedirectStandardOutput = true,
            RedirectStandardError = true,
            UseShellExecute = false,
        };
        info.ArgumentList.Add(dll);
        foreach (string arg in args)
        {
            info.ArgumentList.Add(arg);
        }
        info.ArgumentList.Add("--listen");
        info.ArgumentList.Add("127.0.0.1:0");
        var process = new Process { StartInfo = info, EnableRaisingEvents = true };
        var server = new NbdServerProcess(process);
        process.OutputDataReceived += (_, e) => server.OnLine(e.Data);
        process.ErrorDataReceived += (_, e) => server.OnLine(e.Data);
        process.Exited += (_, _) => server._port.TrySetException(new InvalidOperationException($"nbd-server exited with {process.ExitCode} before listening:\n{server.Log}"));
        process.Start();
        process.BeginOutputReadLine();
        process.BeginErrorReadLine();
        try
        {
            await server._port.Task.WaitAsync(TimeSpan.FromSeconds(30));
        }
        catch
        {
            server.Dispose();
            throw;
        }
        return server;
    }

    /// <summary>Sends SIGTERM and waits for a clean exit; returns the exit code.</summary>
    public async Task<int> StopAsync(TimeSpan timeout)
    {
        if (!_process.HasExited)
        {
            _ = Process.Start("kill", ["-TERM", _process.Id.ToString(System.Globalization.CultureInfo.InvariantCulture)])?.WaitForExit(5000);
        }
        await _process.WaitForExitAsync().WaitAsync(timeout);
        return _process.ExitCode;
    }

    public void Dispose()
    {
        try
        {
            if (!_process.HasExited)
            {
                _process.Kill(entireProcessTree: true);
                _process.WaitForExit(10_000);
            }
        }
        catch (InvalidOperationException)
        {
        }
        _process.Dispose();
    }

    private void OnLine(string? line)
    {
        if (line is null)
        {
            return;
        }
        lock (_log)
        {
            _log.AppendLine(line);
        }
        Match match = ListeningLine().Match(line);
        if (match.Success)
        {
            _port.TrySetResult(int.Parse(match.Groups[1].Value, System.Globalization.CultureInfo.InvariantCulture));
        }
    }

    [GeneratedRegex(@"Serving NBD on 127\.0\.0\.1:(\d+)")]
    private static partial Regex ListeningLine();
}
