using System.Globalization;
using System.Net.Sockets;
using System.Text;

namespace NbdServer.SystemTests;

/// <summary>
/// The operator's first minute: publish self-contained binaries, install them with the units and
/// the default config into a temporary root, verify the units with systemd-analyze, and start
/// the installed binaries from the installed config (overridden by environment variables, as a
/// unit's EnvironmentFile would) under a fake systemd notify socket.
/// </summary>
[TestFixture]
[Category("Operations")]
[NonParallelizable]
public sealed class OperationsTests
{
    private static readonly TimeSpan Start = TimeSpan.FromSeconds(60);
    private string _root = null!;

    [SetUp]
    public void SetUp() => _root = Directory.CreateTempSubdirectory("nbd-ops-").FullName;

    [TearDown]
    public void TearDown()
    {
        try
        {
            Directory.Delete(_root, recursive: true);
        }
        catch (IOException)
        {
        }
    }

    [Test]
    [CancelAfter(600_000)]
    [System.Runtime.Versioning.SupportedOSPlatform("linux")]
    public async Task Published_and_installed_binaries_pass_systemd_verify_and_serve_from_the_installed_config()
    {
        string published = await PublishAsync();
        string destdir = Path.Combine(_root, "destdir");
        ExternalTool.Result install = await ExternalTool.RunAsync(Path.Combine(Repository.Root, "scripts/install.sh"), ["--destdir", destdir, "--from", published], TimeSpan.FromMinutes(1));
        Assert.That(install.ExitCode, Is.Zero, install.ToString());
        string bin = Path.Combine(destdir, "usr/local/bin");
        string conf = Path.Combine(destdir, "etc/nbd-server");
        Assert.That(File.Exists(Path.Combine(destdir, "etc/systemd/system/nbd-server.service")), Is.True);
        Assert.That(File.Exists(Path.Combine(conf, "nbd-server.json")), Is.True);

        // systemd-analyze verify inside the staged root (ExecStart= binaries must exist there); it
        // needs the distribution's own units for the default dependencies.
        Directory.CreateDirectory(Path.Combine(destdir, "usr/lib/systemd"));
        await ExternalTool.RunAsync("cp", ["-r", "/usr/lib/systemd/system", Path.Combine(destdir, "usr/lib/systemd/")], TimeSpan.FromMinutes(1));
        if (!Directory.Exists(Path.Combine(destdir, "lib")))
        {
            File.CreateSymbolicLink(Path.Combine(destdir, "lib"), "usr/lib");
        }
        ExternalTool.Result verify = await ExternalTool.RunAsync("systemd-analyze",
            ["verify", $"--root={destdir}", "/etc/systemd/system/nbd-server.service", "nbd-downstairs@r0.service"], TimeSpan.FromMinutes(1));
        Assert.That(verify.ExitCode, Is.Zero, verify.ToString());
        Assert.That(verify.Error.Trim(), Is.Empty, "systemd-analyze warned:\n" + verify);

        // TLS as the README's install does it: the installed nbd-certs makes the CA and the directories
        // (loopback addresses here), used as the units use their credentials directory.
        Assert.That(File.GetUnixFileMode(Path.Combine(conf, "tls")), Is.EqualTo(UnixFileMode.UserRead | UnixFileMode.UserWrite | UnixFileMode.UserExecute));
        string certs = Path.Combine(bin, "nbd-certs");
        string ca = Path.Combine(_root, "nbd-ca");
        string dsTls = Path.Combine(_root, "tls-ds");
        string upTls = Path.Combine(_root, "tls-guest");
        foreach (string[] args in new[]
                 {
                     new[] { "ca", "--dir", ca },
                     ["server", "--ca", ca, "--name", "s1", "--ip", "127.0.0.1", "--out", dsTls],
                     ["client", "--ca", ca, "--name", "upstairs", "--out", upTls],
                 })
        {
            ExternalTool.Result made = await ExternalTool.RunAsync(certs, args, TimeSpan.FromMinutes(1));
            Assert.That(made.ExitCode, Is.Zero, made.ToString());
        }

        // Three regions and three downstairs from the installed binary and shared config (which
        // allows only the client "upstairs"); the config's "listen" (0.0.0.0:3810) is overridden by
        // the environment, as downstairs-rN.env would, and --tls-dir is what the unit adds.
        var downstairs = new List<LoggedProcess>();
        LoggedProcess? server = null;
        using var notify = new Socket(AddressFamily.Unix, SocketType.Dgram, ProtocolType.Unspecified);
        string notifyPath = Path.Combine(_root, "notify.sock");
        notify.Bind(new UnixDomainSocketEndPoint(notifyPath));
        try
        {
            var endPoints = new List<string>();
            for (int i = 0; i < 3; i++)
            {
                string data = Path.Combine(_root, $"r{i}");
                ExternalTool.Result create = await ExternalTool.RunAsync(Path.Combine(bin, "nbd-downstairs"), ["create", "--data", data, "--size", "64MiB", "--extent-size", "1024"], TimeSpan.FromMinutes(1));
                Assert.That(create.ExitCode, Is.Zero, create.ToString());
                LoggedProcess ds = LoggedProcess.Start(Path.Combine(bin, "nbd-downstairs"), ["run", "--config", Path.Combine(conf, "nbd-downstairs.json"), "--data", data, "--tls-dir", dsTls],
                    new Dictionary<string, string> { ["NBD_DOWNSTAIRS_LISTEN"] = "127.0.0.1:0" });
                downstairs.Add(ds);
                endPoints.Add($"127.0.0.1:{await ds.WaitForPortAsync(@"Listening on 127\.0\.0\.1:(\d+)", Start)}");
            }

            var environment = new Dictionary<string, string>
            {
                ["NBD_SERVER_DOWNSTAIRS"] = string.Join(',', endPoints),
                ["NBD_SERVER_DOWNSTAIRS_TLS_DIR"] = upTls,
                ["NBD_SERVER_LISTEN"] = "127.0.0.1:0",
                ["NBD_SERVER_UNIX"] = Path.Combine(_root, "nbd.sock"),
                ["NBD_SERVER_CONTROL"] = Path.Combine(_root, "control.sock"),
                ["NBD_SERVER_METRICS"] = "127.0.0.1:0",
                ["NOTIFY_SOCKET"] = notifyPath,
                ["WATCHDOG_USEC"] = "400000",
                ["JOURNAL_STREAM"] = "8:12345",
            };
            server = LoggedProcess.Start(Path.Combine(bin, "nbd-server"), ["--config", Path.Combine(conf, "nbd-server.json")], environment);
            int port = await server.WaitForPortAsync(@"Serving NBD on 127\.0\.0\.1:(\d+)", Start);
            int metricsPort = await server.WaitForPortAsync(@"metrics on http://127\.0\.0\.1:(\d+)/metrics", Start);

            // READY=1 once serving (the log line above comes first); the watchdog pings every WATCHDOG_USEC / 2.
            List<string> messages = await ReceiveAsync(notify, m => m == "READY=1", TimeSpan.FromSeconds(20));
            List<string> after = await ReceiveAsync(notify, m => m == "WATCHDOG=1", TimeSpan.FromSeconds(5));
            Assert.That(messages.Concat(after), Does.Contain("READY=1").And.Contain("WATCHDOG=1"));

            ExternalTool.Result info = await ExternalTool.RunAsync("nbdinfo", [$"nbd://127.0.0.1:{port}/vol0"], TimeSpan.FromSeconds(30));
            Assert.That(info.ExitCode, Is.Zero, info.ToString());
            Assert.That(info.Output, Does.Contain("export-size: 67108864"));
            ExternalTool.Result io = await ExternalTool.RunAsync("qemu-io", ["-f", "raw", "-c", "write -P 0x5a 0 1M", "-c", "read -P 0x5a 0 1M", $"nbd://127.0.0.1:{port}/vol0"], TimeSpan.FromSeconds(60));
            Assert.That(io.ExitCode, Is.Zero, io.ToString());

            // The installed config's kernel-client path: the NBD Unix socket, root only, serving the same data.
            NbdServer.Common.Posix.PosixFileStatus nbdSocket = NbdServer.Common.Posix.UnixSocketFile.Stat(Path.Combine(_root, "nbd.sock"))!.Value;
            Assert.That((nbdSocket.IsSocket, nbdSocket.Mode), Is.EqualTo((true, UnixFileMode.UserRead | UnixFileMode.UserWrite)));
            ExternalTool.Result overUnix = await ExternalTool.RunAsync("qemu-io", ["-f", "raw", "-c", "read -P 0x5a 0 1M", $"nbd+unix:///vol0?socket={Path.Combine(_root, "nbd.sock")}"], TimeSpan.FromSeconds(60));
            Assert.That(overUnix.ExitCode, Is.Zero, overUnix.ToString());

            // The control socket: the server's user only (root here), and `nbd-server status` reaches it.
            NbdServer.Common.Posix.PosixFileStatus control = NbdServer.Common.Posix.UnixSocketFile.Stat(Path.Combine(_root, "control.sock"))!.Value;
            Assert.That((control.IsSocket, control.Mode, control.Uid), Is.EqualTo((true, UnixFileMode.UserRead | UnixFileMode.UserWrite, NbdServer.Common.Posix.UnixSocketFile.Stat(_root)!.Value.Uid)));
            ExternalTool.Result status = await ExternalTool.RunAsync(Path.Combine(bin, "nbd-server"), ["status", "--control", Path.Combine(_root, "control.sock")], TimeSpan.FromSeconds(30));
            Assert.That(status.Output, Does.Contain("3/3 replicas in service"), status.ToString());

            string metrics = await ScrapeAsync(metricsPort);
            Assert.That(metrics, Does.Contain("nbd_frontend_requests_total{command=\"write\"}"));
            Assert.That(metrics, Does.Contain("nbd_replica_outstanding_jobs{replica=\"0\"}"));

            Assert.That(downstairs[0].Log, Does.Contain("TLS required").And.Contain("allowed: upstairs"));

            // Under the journal: "<6>message", no timestamp.
            Assert.That(server.Log, Does.Match(@"(?m)^<6>Serving NBD on "));

            Assert.That(await server.TerminateAsync(TimeSpan.FromSeconds(60)), Is.Zero, server.Log);
            List<string> stopping = await ReceiveAsync(notify, m => m == "STOPPING=1", TimeSpan.FromSeconds(5));
            Assert.That(stopping, Does.Contain("STOPPING=1"));
            Assert.That(File.Exists(Path.Combine(_root, "control.sock")), Is.False, "the control socket outlived the server");
            foreach (LoggedProcess ds in downstairs)
            {
                Assert.That(await ds.TerminateAsync(TimeSpan.FromSeconds(30)), Is.Zero, ds.Log);
            }
        }
        finally
        {
            server?.Dispose();
            foreach (LoggedProcess ds in downstairs)
            {
                ds.Dispose();
            }
        }
    }

    /// <summary>
    /// scripts/publish.sh (without ReadyToRun: its compile takes minutes on a small machine) into
    /// artifacts/publish-test, reused while no source file is newer than the binaries.
    /// </summary>
    private static async Task<string> PublishAsync()
    {
        string output = Path.Combine(Repository.Root, "artifacts/publish-test/linux-x64");
        string[] binaries = [Path.Combine(output, "nbd-server"), Path.Combine(output, "nbd-downstairs"), Path.Combine(output, "nbd-certs"), Path.Combine(output, "nbd-verify")];
        DateTime newestSource = Directory.EnumerateFiles(Path.Combine(Repository.Root, "src"), "*", SearchOption.AllDirectories)
            .Where(f => !f.Contains("/bin/", StringComparison.Ordinal) && !f.Contains("/obj/", StringComparison.Ordinal))
            .Append(Path.Combine(Repository.Root, "Directory.Packages.props"))
            .Max(File.GetLastWriteTimeUtc);
        if (binaries.All(File.Exists) && binaries.Min(File.GetLastWriteTimeUtc) > newestSource)
        {
            return output;
        }
        ExternalTool.Result publish = await ExternalTool.RunAsync(Path.Combine(Repository.Root, "scripts/publish.sh"), ["--no-r2r", "--output", output], TimeSpan.FromMinutes(9));
        Assert.That(publish.ExitCode, Is.Zero, publish.ToString());
        foreach (string b in binaries)
        {
            File.SetLastWriteTimeUtc(b, DateTime.UtcNow);
        }
        return output;
    }

    private static async Task<List<string>> ReceiveAsync(Socket socket, Func<string, bool> until, TimeSpan timeout)
    {
        var messages = new List<string>();
        using var cancel = new CancellationTokenSource(timeout);
        byte[] buffer = new byte[4096];
        try
        {
            while (true)
            {
                int n = await socket.ReceiveAsync(buffer, SocketFlags.None, cancel.Token);
                string message = Encoding.UTF8.GetString(buffer, 0, n);
                messages.Add(message);
                if (until(message))
                {
                    return messages;
                }
            }
        }
        catch (OperationCanceledException)
        {
            Assert.Fail($"no matching sd_notify message within {timeout.TotalSeconds:0} s; got: {string.Join(" | ", messages)}");
            throw;
        }
    }

    internal static async Task<string> ScrapeAsync(int port)
    {
        using var http = new HttpClient { Timeout = TimeSpan.FromSeconds(10) };
        return await http.GetStringAsync(new Uri(string.Create(CultureInfo.InvariantCulture, $"http://127.0.0.1:{port}/metrics")));
    }
}
