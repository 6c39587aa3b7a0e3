using System.Collections.Concurrent;
using System.Diagnostics;
using System.Net;
using System.Text.RegularExpressions;
using NbdServer.Protocol;

namespace NbdServer.Downstairs.Tests;

/// <summary>A real `dotnet nbd-downstairs.dll` process, its output captured line by line.</summary>
internal sealed partial class DownstairsProcess : IAsyncDisposable
{
    private readonly Process _process;
    private readonly ConcurrentQueue<string> _lines = new();
    private int _disposed;

    private DownstairsProcess(Process process) => _process = process;

    public static string Dll => Path.Combine(AppContext.BaseDirectory, "nbd-downstairs.dll");

    public IPEndPoint Endpoint { get; private set; } = null!;

    public int Pid => _process.Id;

    public bool HasExited => _process.HasExited;

    public IReadOnlyCollection<string> Lines => _lines;

    /// <summary>Runs a one-shot command (create, info, --help…) to completion.</summary>
    public static async Task<(int ExitCode, string Stdout, string Stderr)> RunToolAsync(params string[] args)
    {
        using Process p = Process.Start(StartInfo(args, null))!;
        Task<string> stdout = p.StandardOutput.ReadToEndAsync();
        Task<string> stderr = p.StandardError.ReadToEndAsync();
        using var cts = new CancellationTokenSource(TimeSpan.FromSeconds(60));
        await p.WaitForExitAsync(cts.Token);
        return (p.ExitCode, await stdout, await stderr);
    }

    public static async Task<DownstairsProcess> StartAsync(string dataDir, IEnumerable<string>? extraArgs = null, IDictionary<string, string>? environment = null)
    {
        string[] args = ["run", "--data", dataDir, "--listen", "127.0.0.1:0", .. extraArgs ?? []];
        var process = new Process { StartInfo = StartInfo(args, environment), EnableRaisingEvents = true };
        var ds = new DownstairsProcess(process);
        var listening = new TaskCompletionSource<IPEndPoint>(TaskCreationOptions.RunContinuationsAsynchronously);
        void OnLine(string? line)
        {
            if (line is null)
            {
                return;
            }
            ds._lines.Enqueue(line);
            Match m = ListeningLine().Match(line);
            if (m.Success)
            {
                listening.TrySetResult(IPEndPoint.Parse(m.Groups[1].Value));
            }
        }
        process.OutputDataReceived += (_, e) => OnLine(e.Data);
        process.ErrorDataReceived += (_, e) => OnLine(e.Data);
        process.Exited += (_, _) => listening.TrySetException(new InvalidOperationException("nbd-downstairs exited before listening:\n" + string.Join("\n", ds._lines)));
        process.Start();
        process.BeginOutputReadLine();
        process.BeginErrorReadLine();
        ds.Endpoint = await listening.Task.WaitAsync(TimeSpan.FromSeconds(30));
        return ds;
    }

    public Task<DownstairsClient> ConnectAsync(ulong generation = 1, bool readOnly = false, Guid? upstairs = null, Guid? region = null) =>
        DownstairsClient.ConnectAsync(Endpoint, new HelloRequest(Wire.ProtocolVersion, readOnly, region ?? Guid.Empty, upstairs ?? Guid.NewGuid(), Guid.NewGuid(), generation));

    /// <summary>Resident set size from /proc (what the kernel charges the process).</summary>
    public long RssBytes()
    {
        foreach (string line in File.ReadLines($"/proc/{_process.Id}/status"))
        {
            if (line.StartsWith("VmRSS:", StringComparison.Ordinal))
            {
                return long.Parse(line.Split(' ', StringSplitOptions.RemoveEmptyEntries)[1], System.Globalization.CultureInfo.InvariantCulture) * 1024;
            }
        }
        throw new InvalidOperationException("no VmRSS");
    }

    public void KillHard()
    {
        if (!_process.HasExited)
        {
            _process.Kill();
            _process.WaitForExit(10_000);
        }
    }

    public async ValueTask DisposeAsync()
    {
        if (Interlocked.Exchange(ref _disposed, 1) != 0)
        {
            return;
        }
        KillHard();
        await _process.WaitForExitAsync().WaitAsync(TimeSpan.FromSeconds(10));
        _process.Dispose();
    }

    private static ProcessStartInfo StartInfo(IEnumerable<string> args, IDictionary<string, string>? environment)
    {
        var psi = new ProcessStartInfo("dotnet") { RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false };
        psi.ArgumentList.Add(Dll);
        foreach (string a in args)
        {
            psi.ArgumentList.Add(a);
        }
        foreach ((string k, string v) in environment ?? new Dictionary<string, string>())
        {
            psi.Environment[k] = v;
        }
        return psi;
    }

    [GeneratedRegex(@"Listening on (\S+:\d+)")]
    private static partial Regex ListeningLine();
}

/// <summary>Temp directory removed at dispose.</summary>
internal sealed class TempDir : IDisposable
{
    public TempDir() => Directory.CreateDirectory(Path);

    public string Path { get; } = System.IO.Path.Combine(System.IO.Path.GetTempPath(), "ds-test-" + Guid.NewGuid().ToString("N")[..12]);

    public string Sub(string name) => System.IO.Path.Combine(Path, name);

    public void Dispose()
    {
        try
        {
            Directory.Delete(Path, recursive: true);
        }
        catch (IOException)
        {
            // Best effort; a tmpfs mount point may still be busy.
        }
    }
}

internal static class TestData
{
    /// <summary>Deterministic block content for (block, version): verifiable after a crash.</summary>
    public static byte[] Block(int blockSize, long block, long version)
    {
        byte[] b = new byte[blockSize];
        new Random(HashCode.Combine(block, version)).NextBytes(b);
        BitConverter.TryWriteBytes(b, block);
        BitConverter.TryWriteBytes(b.AsSpan(8), version);
        return b;
    }
}
