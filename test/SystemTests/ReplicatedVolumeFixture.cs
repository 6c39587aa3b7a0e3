using System.Diagnostics;
using System.Globalization;
using System.Net.Sockets;
using System.Text;
using System.Text.Json;
using System.Text.RegularExpressions;

namespace NbdServer.SystemTests;

/// <summary>
/// One real <c>nbd-downstairs run</c> process on loopback. The port it first got (it binds
/// 127.0.0.1:0 and logs "Listening on …") is kept, so a restart comes back where the upstairs
/// expects it.
/// </summary>
internal sealed partial class DownstairsNode : IDisposable
{
    private readonly StringBuilder _log = new();
    private Process? _process;

    public DownstairsNode(int index, string dataDir)
    {
        Index = index;
        DataDir = dataDir;
    }

    public int Index { get; }

    public string DataDir { get; }

    public int Port { get; private set; }

    public string EndPoint => $"127.0.0.1:{Port.ToString(CultureInfo.InvariantCulture)}";

    public bool IsRunning => _process is { HasExited: false };

    /// <summary>Arguments every start of this node gets (the TLS settings of a TLS volume), before the per-start ones.</summary>
    public string[] BaseArgs { get; set; } = [];

    public int ProcessId => _process?.Id ?? throw new InvalidOperationException($"downstairs {Index} is not running");

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

    /// <summary>Starts the process (on its earlier port after the first start) and waits until it listens.</summary>
    public async Task StartAsync(string[] extraArgs, TimeSpan timeout)
    {
        if (IsRunning)
        {
            throw new InvalidOperationException($"downstairs {Index} is already running");
        }
        _process?.Dispose();
        var listening = new TaskCompletionSource<int>(TaskCreationOptions.RunContinuationsAsynchronously);
        var info = new ProcessStartInfo("dotnet")
        {
            RedirectStandardOutput = true,
            RedirectStandardError = true,
            UseShellExecute = false,
        };
        foreach (string arg in (string[])[Path.Combine(AppContext.BaseDirectory, "nbd-downstairs.dll"), "run", "--data", DataDir,
                     "--listen", $"127.0.0.1:{Port.ToString(CultureInfo.InvariantCulture)}", .. BaseArgs, .. extraArgs])
        {
            info.ArgumentList.Add(arg);
        }
        var process = new Process { StartInfo = info, EnableRaisingEvents = true };
        void OnLine(string? line)
        {
            if (line is null)
            {
                return;
            }
            lock (_log)
            {
                _log.Append(CultureInfo.InvariantCulture, $"[ds{Index}] ").AppendLine(line);
            }
            if (ListeningLine().Match(line) is { Success: true } m)
            {
                listening.TrySetResult(int.Parse(m.Groups[1].Value, CultureInfo.InvariantCulture));
            }
        }
        process.OutputDataReceived += (_, e) => OnLine(e.Data);
        process.ErrorDataReceived += (_, e) => OnLine(e.Data);
        process.Exited += (_, _) => listening.TrySetException(new InvalidOperationException($"downstairs {Index} exited with {process.ExitCode} before listening:\n{Log}"));
        process.Start();
        _process = process;
        process.BeginOutputReadLine();
        process.BeginErrorReadLine();
        int port = await listening.Task.WaitAsync(timeout);
        if (Port != 0 && port != Port)
        {
            throw new InvalidOperationException($"downstairs {Index} came back on port {port}, not {Port}");
        }
        Port = port;
    }

    /// <summary>SIGKILL: the process dies at once, nothing is flushed or closed cleanly.</summary>
    public void Kill()
    {
        if (IsRunning)
        {
            _process!.Kill();
            _process.WaitForExit(10_000);
        }
    }

    public void Signal(string signal)
    {
        using Process kill = Process.Start("kill", [$"-{signal}", ProcessId.ToString(CultureInfo.InvariantCulture)]);
        kill.WaitForExit(5_000);
    }

    /// <summary>SIGTERM and a bounded wait for a clean exit (SIGKILL if it does not come).</summary>
    public async Task StopAsync(TimeSpan timeout)
    {
        if (!IsRunning)
        {
            return;
        }
        Signal("CONT");
        Signal("TERM");
        try
        {
            await _process!.WaitForExitAsync().WaitAsync(timeout);
        }
        catch (TimeoutException)
        {
            Kill();
            throw new TimeoutException($"downstairs {Index} did not exit within {timeout.TotalSeconds:0} s of SIGTERM:\n{Log}");
        }
    }

    public void Dispose()
    {
        try
        {
            if (IsRunning)
            {
                Signal("CONT"); // a stopped process still dies of SIGKILL, but let its pipes drain
                _process!.Kill(entireProcessTree: true);
                _process.WaitForExit(10_000);
            }
        }
        catch (InvalidOperationException)
        {
        }
        _process?.Dispose();
    }

    [GeneratedRegex(@"Listening on 127\.0\.0\.1:(\d+)")]
    private static partial Regex ListeningLine();
}

/// <summary>
/// A complete local replicated volume made of real processes: three regions in a scratch
/// directory, three <c>nbd-downstairs</c> on loopback and one <c>nbd-server --downstairs</c>.
/// Every wait is bounded; <see cref="Dispose"/> kills whatever still runs.
/// </summary>
internal sealed partial class ReplicatedVolumeFixture : IDisposable
{
    public static readonly TimeSpan ProcessTimeout = TimeSpan.FromSeconds(30);

    private readonly ScratchDirectory _scratch;
    private readonly List<NbdServerProcess> _oldUpstairs = [];
    private HttpClient? _control;

    private ReplicatedVolumeFixture(ScratchDirectory scratch, long size)
    {
        _scratch = scratch;
        Size = size;
        Downstairs = [.. Enumerable.Range(0, 3).Select(i => new DownstairsNode(i, scratch.File($"region{i}")))];
    }

    public long Size { get; }

    public string Scratch => _scratch.Path;

    public IReadOnlyList<DownstairsNode> Downstairs { get; }

    public NbdServerProcess? Upstairs { get; private set; }

    /// <summary>nbd-server's control socket (a fresh one per fixture, in its scratch directory).</summary>
    public string ControlPath => System.IO.Path.Combine(Scratch, "control.sock");

    public string Uri => (Upstairs ?? throw new InvalidOperationException("nbd-server is not running")).Uri();

    public string[] RegionDirs => [.. Downstairs.Select(d => d.DataDir)];

    /// <summary>In TLS mode: the upstairs' TLS directory (ca-cert.pem, client-cert.pem, client-key.pem); null otherwise.</summary>
    public string? UpstairsTlsDir { get; private set; }

    /// <summary>In TLS mode: the CA directory nbd-certs made (to issue more certificates in a test).</summary>
    public string? CaDir { get; private set; }

    /// <summary>Creates three regions (4 KiB blocks, 1 MiB extents) and starts everything.</summary>
    public static Task<ReplicatedVolumeFixture> StartAsync(string name, long size, params string[] upstairsArgs) =>
        StartAsync(name, size, tls: false, upstairsArgs);

    /// <summary>
    /// Like <see cref="StartAsync(string, long, string[])"/>, with mutual TLS on every upstairs ↔
    /// downstairs link: nbd-certs makes a CA, a server certificate per downstairs (IP 127.0.0.1)
    /// and a client certificate "upstairs"; each downstairs allows only that client.
    /// </summary>
    public static Task<ReplicatedVolumeFixture> StartTlsAsync(string name, long size, params string[] upstairsArgs) =>
        StartAsync(name, size, tls: true, upstairsArgs);

    private static async Task<ReplicatedVolumeFixture> StartAsync(string name, long size, bool tls, string[] upstairsArgs)
    {
        var fixture = new ReplicatedVolumeFixture(new ScratchDirectory(name), size);
        try
        {
            if (tls)
            {
                await fixture.MakeCertificatesAsync();
                upstairsArgs = ["--downstairs-tls-dir", fixture.UpstairsTlsDir!, .. upstairsArgs];
            }
            await Task.WhenAll(fixture.Downstairs.Select(async d =>
            {
                ExternalTool.Result r = await RunDotnetAsync("nbd-downstairs.dll",
                    ["create", "--data", d.DataDir, "--size", size.ToString(CultureInfo.InvariantCulture), "--block-size", "4096", "--extent-size", "256"], ProcessTimeout);
                Assert.That(r.ExitCode, Is.EqualTo(0), $"create region {d.Index}: {r}");
            }));
            await Task.WhenAll(fixture.Downstairs.Select(d => d.StartAsync([], ProcessTimeout)));
            await fixture.StartUpstairsAsync(upstairsArgs);
            return fixture;
        }
        catch
        {
            fixture.Dispose();
            throw;
        }
    }

    private async Task MakeCertificatesAsync()
    {
        CaDir = _scratch.File("tls/ca");
        UpstairsTlsDir = _scratch.File("tls/upstairs");
        await CertsAsync("ca", "--dir", CaDir);
        await CertsAsync("client", "--ca", CaDir, "--name", "upstairs", "--out", UpstairsTlsDir);
        foreach (DownstairsNode d in Downstairs)
        {
            string dir = _scratch.File($"tls/ds{d.Index}");
            await CertsAsync("server", "--ca", CaDir, "--name", $"ds{d.Index}", "--ip", "127.0.0.1", "--out", dir);
            d.BaseArgs = ["--tls-dir", dir, "--tls-allow-client", "upstairs"];
        }
    }

    /// <summary>Runs the real nbd-certs tool; fails the test if it fails.</summary>
    public static async Task CertsAsync(params string[] args)
    {
        ExternalTool.Result r = await RunDotnetAsync("nbd-certs.dll", args, ProcessTimeout);
        Assert.That(r.ExitCode, Is.EqualTo(0), $"nbd-certs {string.Join(' ', args)}: {r}");
    }

    /// <summary>Starts nbd-server against the three downstairs (a previous one must be gone).</summary>
    public async Task StartUpstairsAsync(params string[] extraArgs)
    {
        if (Upstairs is { HasExited: false })
        {
            throw new InvalidOperationException("nbd-server is still running");
        }
        if (Upstairs is not null)
        {
            _oldUpstairs.Add(Upstairs);
        }
        Upstairs = null;
        // Its pooled connection went to the old server's socket.
        _control?.Dispose();
        _control = null;
        Upstairs = await NbdServerProcess.StartAsync(["--downstairs", string.Join(',', Downstairs.Select(d => d.EndPoint)),
            "--control", ControlPath, .. extraArgs]);
        Assert.That(Upstairs.Log, Does.Contain($"Control socket on {ControlPath}"), $"no control socket line in the nbd-server log:\n{Upstairs.Log}");
    }

    /// <summary>
    /// Stops nbd-server (SIGTERM: it drains and flushes, as <c>systemctl restart</c> does) and starts
    /// a new one on the same port, where a client that reconnects (<c>nbd-client -persist</c>) finds it.
    /// </summary>
    public async Task RestartUpstairsOnItsPortAsync(params string[] extraArgs)
    {
        NbdServerProcess old = Upstairs ?? throw new InvalidOperationException("nbd-server is not running");
        int port = old.Port;
        int code = await old.StopAsync(ProcessTimeout);
        Assert.That(code, Is.EqualTo(0), $"nbd-server exit code on SIGTERM:\n{old.Log}");
        await StartUpstairsAsync([.. extraArgs, "--listen", $"127.0.0.1:{port.ToString(CultureInfo.InvariantCulture)}"]);
    }

    /// <summary>
    /// SIGHUP of nbd-server (<c>systemctl reload</c>): a new image of the same process takes the
    /// clients over without a disconnect. Returns once it serves them.
    /// </summary>
    public async Task ReloadUpstairsAsync()
    {
        await (Upstairs ?? throw new InvalidOperationException("nbd-server is not running")).ReloadAsync(ProcessTimeout);
        // The pooled control connection went to the old image's socket.
        _control?.Dispose();
        _control = null;
    }

    /// <summary>SIGKILL of nbd-server: nothing it held is flushed.</summary>
    public void KillUpstairs()
    {
        if (Upstairs is { HasExited: false } up)
        {
            using Process p = Process.GetProcessById(up.ProcessId);
            p.Kill();
            p.WaitForExit(10_000);
        }
    }

    /// <summary><c>nbd-server status --json</c>, parsed.</summary>
    public async Task<VolumeStatus> StatusAsync()
    {
        ExternalTool.Result r = await RunDotnetAsync("nbd-server.dll",
            ["status", "--control", ControlPath, "--json"], TimeSpan.FromSeconds(20));
        Assert.That(r.ExitCode, Is.EqualTo(0), $"nbd-server status: {r}");
        return VolumeStatus.Parse(r.Output);
    }

    /// <summary>
    /// The same status read straight from the control socket (GET /status), without starting a
    /// process: a few milliseconds, for catching a state that lasts well under a second.
    /// </summary>
    public async Task<VolumeStatus> ControlStatusAsync(CancellationToken cancellationToken)
    {
        _control ??= new HttpClient(new SocketsHttpHandler
        {
            ConnectCallback = async (_, cancel) =>
            {
                var socket = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
                try
                {
                    await socket.ConnectAsync(new UnixDomainSocketEndPoint(ControlPath), cancel);
                    return new NetworkStream(socket, ownsSocket: true);
                }
                catch
                {
                    socket.Dispose();
                    throw;
                }
            },
        })
        { Timeout = TimeSpan.FromSeconds(10) };
        return VolumeStatus.Parse(await _control.GetStringAsync(new Uri("http://localhost/status"), cancellationToken));
    }

    /// <summary>Polls status until <paramref name="condition"/> holds; fails the test with the last status when the time is up.</summary>
    public async Task<VolumeStatus> WaitForStatusAsync(Func<VolumeStatus, bool> condition, TimeSpan timeout, string what)
    {
        var clock = Stopwatch.StartNew();
        VolumeStatus status = await StatusAsync();
        while (!condition(status))
        {
            if (clock.Elapsed > timeout)
            {
                Assert.Fail($"{what}: not reached within {timeout.TotalSeconds:0} s; last status:\n{status.Json}\n{AllLogs()}");
            }
            await Task.Delay(200);
            status = await StatusAsync();
        }
        return status;
    }

    /// <summary>
    /// SIGTERM to nbd-server (it drains and flushes), then to every downstairs; all bounded.
    /// Afterwards the regions are closed and may be compared.
    /// </summary>
    public async Task StopAllAsync()
    {
        if (Upstairs is { HasExited: false } up)
        {
            int code = await up.StopAsync(ProcessTimeout);
            Assert.That(code, Is.EqualTo(0), $"nbd-server exit code:\n{up.Log}");
        }
        await Task.WhenAll(Downstairs.Select(d => d.StopAsync(ProcessTimeout)));
    }

    /// <summary><c>nbd-downstairs compare</c> of the three regions.</summary>
    public Task<ExternalTool.Result> CompareAsync() =>
        RunDotnetAsync("nbd-downstairs.dll", ["compare", .. RegionDirs], TimeSpan.FromSeconds(60));

    public string AllLogs()
    {
        var text = new StringBuilder();
        foreach (NbdServerProcess old in _oldUpstairs)
        {
            text.AppendLine("--- earlier nbd-server ---").Append(old.Log);
        }
        if (Upstairs is not null)
        {
            text.AppendLine("--- nbd-server ---").Append(Upstairs.Log);
        }
        foreach (DownstairsNode d in Downstairs)
        {
            text.AppendLine(CultureInfo.InvariantCulture, $"--- downstairs {d.Index} ---").Append(d.Log);
        }
        return text.ToString();
    }

    public static Task<ExternalTool.Result> RunDotnetAsync(string dll, IEnumerable<string> args, TimeSpan timeout) =>
        ExternalTool.RunAsync("dotnet", [Path.Combine(AppContext.BaseDirectory, dll), .. args], timeout);

    public void Dispose()
    {
        _control?.Dispose();
        Upstairs?.Dispose();
        foreach (NbdServerProcess old in _oldUpstairs)
        {
            old.Dispose();
        }
        foreach (DownstairsNode d in Downstairs)
        {
            d.Dispose();
        }
        _scratch.Dispose();
    }

}

internal sealed record VolumeStatus(ulong Generation, int InService, string[] States, long[] Faults, string Json)
{
    public bool AllActive => States.All(s => s == "Active");

    /// <summary>Per replica: extents its live repair has copied so far, and of how many.</summary>
    public int[] RepairDone { get; init; } = [];

    public int[] RepairTotal { get; init; } = [];

    /// <summary>The status JSON of the control endpoint (camelCase).</summary>
    public static VolumeStatus Parse(string json)
    {
        using JsonDocument document = JsonDocument.Parse(json);
        JsonElement root = document.RootElement;
        JsonElement[] replicas = [.. root.GetProperty("replicas").EnumerateArray()];
        return new VolumeStatus(
            root.GetProperty("generation").GetUInt64(),
            root.GetProperty("inService").GetInt32(),
            [.. replicas.Select(x => x.GetProperty("state").GetString() ?? "?")],
            [.. replicas.Select(x => x.GetProperty("faults").GetInt64())],
            json)
        {
            RepairDone = [.. replicas.Select(x => x.TryGetProperty("repairDone", out JsonElement v) ? v.GetInt32() : 0)],
            RepairTotal = [.. replicas.Select(x => x.TryGetProperty("repairTotal", out JsonElement v) ? v.GetInt32() : 0)],
        };
    }
}
