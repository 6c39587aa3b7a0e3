using System.Diagnostics;
using System.Globalization;
using System.Text;
using System.Text.RegularExpressions;

namespace NbdServer.SystemTests;

/// <summary>
/// Any daemon process (an installed binary, or <c>dotnet x.dll</c>) with its own environment,
/// whose output is kept; <see cref="WaitForAsync"/> waits for a log line. Disposing kills it.
/// </summary>
internal sealed class LoggedProcess : IDisposable
{
    private readonly Process _process;
    private readonly StringBuilder _log = new();
    private readonly List<(Regex Pattern, TaskCompletionSource<Match> Found)> _waiters = [];

    private LoggedProcess(Process process) => _process = process;

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

    public int ProcessId => _process.Id;

    public int ExitCode => _process.ExitCode;

    public static LoggedProcess Start(string fileName, IEnumerable<string> args, IReadOnlyDictionary<string, string>? environment = null)
    {
        var info = new ProcessStartInfo(fileName)
        {
            RedirectStandardOutput = true,
            RedirectStandardError = true,
            UseShellExecute = false,
        };
        foreach (string arg in args)
        {
            info.ArgumentList.Add(arg);
        }
        // A clean slate: no NBD_* settings or systemd variables leak in from the test runner.
        foreach (string name in info.Environment.Keys.Where(k => k.StartsWith("NBD_", StringComparison.Ordinal) || k is "NOTIFY_SOCKET" or "WATCHDOG_USEC" or "WATCHDOG_PID" or "JOURNAL_STREAM").ToList())
        {
            info.Environment.Remove(name);
        }
        foreach ((string name, string value) in environment ?? new Dictionary<string, string>())
        {
            info.Environment[name] = value;
        }
        var process = new Process { StartInfo = info, EnableRaisingEvents = true };
        var p = new LoggedProcess(process);
        process.OutputDataReceived += (_, e) => p.OnLine(e.Data);
        process.ErrorDataReceived += (_, e) => p.OnLine(e.Data);
        process.Start();
        process.BeginOutputReadLine();
        process.BeginErrorReadLine();
        return p;
    }

    /// <summary>Waits for a line matching <paramref name="pattern"/> (also one already logged).</summary>
    public async Task<Match> WaitForAsync(string pattern, TimeSpan timeout)
    {
        var regex = new Regex(pattern);
        var found = new TaskCompletionSource<Match>(TaskCreationOptions.RunContinuationsAsynchronously);
        lock (_log)
        {
            Match existing = regex.Match(_log.ToString());
            if (existing.Success)
            {
                return existing;
            }
            _waiters.Add((regex, found));
        }
        Task exited = _process.WaitForExitAsync();
        Task done = await Task.WhenAny(found.Task, exited, Task.Delay(timeout));
        if (done == found.Task)
        {
            return await found.Task;
        }
        throw new TimeoutException($"{(done == exited ? "process exited" : "timed out")} before a line matched /{pattern}/:\n{Log}");
    }

    public async Task<int> WaitForPortAsync(string pattern, TimeSpan timeout) =>
        int.Parse((await WaitForAsync(pattern, timeout)).Groups[1].Value, CultureInfo.InvariantCulture);

    /// <summary>SIGTERM, as systemd stops a unit; returns the exit code.</summary>
    public async Task<int> TerminateAsync(TimeSpan timeout)
    {
        if (!_process.HasExited)
        {
            using Process? kill = Process.Start("kill", ["-TERM", _process.Id.ToString(CultureInfo.InvariantCulture)]);
            kill?.WaitForExit(5000);
        }
        await _process.WaitForExitAsync().WaitAsync(timeout);
        _process.WaitForExit();
        return _process.ExitCode;
    }

    /// <summary>Waits (bounded) for the process to end on its own; returns the exit code.</summary>
    public async Task<int> WaitForExitAsync(TimeSpan timeout, CancellationToken cancellationToken = default)
    {
        try
        {
            await _process.WaitForExitAsync(cancellationToken).WaitAsync(timeout, cancellationToken);
        }
        catch (TimeoutException)
        {
            throw new TimeoutException($"process {_process.Id} did not exit within {timeout.TotalSeconds:0} s:\n{Log}");
        }
        _process.WaitForExit();
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
            foreach ((Regex pattern, TaskCompletionSource<Match> found) in _waiters)
            {
                Match m = pattern.Match(line);
                if (m.Success)
                {
                    found.TrySetResult(m);
                }
            }
        }
    }
}
