namespace NbdServer.SystemTests;

/// <summary>
/// A real <c>nbd-server</c> process on a free loopback port (it binds 127.0.0.1:0 and we read the
/// port from its "Serving NBD on …" line). Disposing kills it; its log is kept for assertions.
/// </summary>
internal sealed class NbdServerProcess : IDisposable
{
    private readonly LoggedProcess _process;

    private NbdServerProcess(LoggedProcess process, int port)
    {
        _process = process;
        Port = port;
    }

    public int Port { get; }

    public int ProcessId => _process.ProcessId;

    public string Log => _process.Log;

    public bool HasExited => _process.HasExited;

    public string Uri(string export = "vol0") => $"nbd://127.0.0.1:{Port}/{export}";

    /// <summary>
    /// Starts <c>nbd-server</c> with <paramref name="args"/> plus <c>--listen 127.0.0.1:0</c>, unless
    /// <paramref name="args"/> name a loopback port of their own (a restart where clients reconnect).
    /// </summary>
    public static Task<NbdServerProcess> StartAsync(params string[] args) => StartImageAsync(Path.Combine(AppContext.BaseDirectory, "nbd-server.dll"), args);

    /// <summary>As <see cref="StartAsync"/>, from the build of nbd-server at <paramref name="dll"/> (a copy a test may break).</summary>
    public static async Task<NbdServerProcess> StartImageAsync(string dll, params string[] args)
    {
        string[] listen = args.Contains("--listen") ? [] : ["--listen", "127.0.0.1:0"];
        LoggedProcess process = LoggedProcess.Start("dotnet", [dll, .. args, .. listen]);
        try
        {
            int port = await process.WaitForPortAsync(@"Serving NBD on 127\.0\.0\.1:(\d+)", TimeSpan.FromSeconds(30));
            return new NbdServerProcess(process, port);
        }
        catch
        {
            process.Dispose();
            throw;
        }
    }

    /// <summary>Reloads handed over and taken over so far (each new image logs one line).</summary>
    public int Reloads => System.Text.RegularExpressions.Regex.Count(Log, "Took over from the previous image");

    /// <summary>
    /// SIGHUP, as <c>systemctl reload</c> sends: the process execs a new image of itself, which takes
    /// the clients over. Returns once the new image serves them; the process ID does not change.
    /// </summary>
    public async Task ReloadAsync(TimeSpan timeout)
    {
        int before = Reloads;
        using (var kill = System.Diagnostics.Process.Start("kill", ["-HUP", ProcessId.ToString(System.Globalization.CultureInfo.InvariantCulture)]))
        {
            await kill.WaitForExitAsync();
        }
        var clock = System.Diagnostics.Stopwatch.StartNew();
        while (Reloads == before)
        {
            Assert.That(HasExited, Is.False, $"nbd-server exited during the reload:\n{Log}");
            Assert.That(clock.Elapsed, Is.LessThan(timeout), $"no new image took over within {timeout.TotalSeconds} s:\n{Log}");
            await Task.Delay(50);
        }
    }

    /// <summary>Sends SIGTERM and waits for a clean exit; returns the exit code.</summary>
    public Task<int> StopAsync(TimeSpan timeout) => _process.TerminateAsync(timeout);

    public void Dispose() => _process.Dispose();
}
