using System.Net.Sockets;
using NbdServer.Common.Posix;
using NbdServer.Frontend.Server;
using NbdServer.ReplicaEngine;

namespace NbdServer.Frontend.Tests;

/// <summary>The control endpoint is a Unix socket only the server's user can open; its TCP form is gone.</summary>
[TestFixture]
[CancelAfter(20_000)]
public sealed class ControlServerTests
{
    private static readonly EngineStatus Status = new(7, 3, 1L << 30, 4096, 1024, 3, []);

    private string _dir = null!;
    private int _scrubs;

    [SetUp]
    public void SetUp()
    {
        _dir = Directory.CreateTempSubdirectory("nbd-control-").FullName;
        _scrubs = 0;
    }

    [TearDown]
    public void TearDown() => Directory.Delete(_dir, recursive: true);

    private string SocketPath => Path.Combine(_dir, "control.sock");

    private ControlServer Start()
    {
        var control = new ControlServer(SocketPath, () => Status, () => Interlocked.Increment(ref _scrubs));
        control.Start();
        return control;
    }

    [Test]
    public async Task Control_socket_is_mode_0600_and_owned_by_the_server_user()
    {
        await using ControlServer control = Start();

        PosixFileStatus socket = UnixSocketFile.Stat(SocketPath)!.Value;
        Assert.That((socket.IsSocket, socket.Mode, socket.Uid, socket.Gid),
            Is.EqualTo((true, UnixFileMode.UserRead | UnixFileMode.UserWrite, UnixSocketFile.Stat(_dir)!.Value.Uid, UnixSocketFile.Stat(_dir)!.Value.Gid)));
    }

    [Test]
    public async Task Another_local_user_cannot_connect_to_the_control_socket()
    {
        if (!OperatingSystem.IsLinux() || Environment.UserName != "root")
        {
            Assert.Ignore("needs root on Linux to act as another user");
            return;
        }
        Assume.That(File.Exists("/usr/bin/setpriv") && File.Exists("/usr/bin/curl"), Is.True, "needs setpriv and curl");
        // The directory is open to everyone, so only the socket's own mode stands in the way.
        File.SetUnixFileMode(_dir, (UnixFileMode)0b111_101_101);
        await using ControlServer control = Start();

        (int nobody, string nobodyError) = await RunAsync("/usr/bin/setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
            "/usr/bin/curl", "-sS", "-X", "POST", "--unix-socket", SocketPath, "http://localhost/scrub");
        (int owner, _) = await RunAsync("/usr/bin/curl", "-sS", "--unix-socket", SocketPath, "http://localhost/status");

        Assert.That(nobody, Is.Not.Zero, "user nobody reached the control socket");
        Assert.That(nobodyError, Does.Contain("ermission denied").Or.Contain("Couldn't connect"));
        Assert.That(owner, Is.Zero, "the owner must still get in");
        Assert.That(_scrubs, Is.Zero);
    }

    private static async Task<(int ExitCode, string Error)> RunAsync(string program, params string[] args)
    {
        var start = new System.Diagnostics.ProcessStartInfo(program) { RedirectStandardError = true, RedirectStandardOutput = true };
        foreach (string a in args)
        {
            start.ArgumentList.Add(a);
        }
        using var process = System.Diagnostics.Process.Start(start)!;
        Task<string> error = process.StandardError.ReadToEndAsync();
        await process.StandardOutput.ReadToEndAsync();
        await process.WaitForExitAsync();
        return (process.ExitCode, await error);
    }

    [Test]
    public async Task Scrub_POST_over_the_socket_starts_a_scrub_and_answers_the_status()
    {
        await using ControlServer control = Start();
        using HttpClient http = StatusCommand.Client(SocketPath);

        using HttpResponseMessage response = await http.PostAsync(new Uri("http://localhost/scrub"), null);
        string body = await response.Content.ReadAsStringAsync();

        Assert.That(response.IsSuccessStatusCode, Is.True, body);
        Assert.That(_scrubs, Is.EqualTo(1));
        Assert.That(body, Does.Contain("\"generation\": 7"));
    }

    [Test]
    public async Task Status_GET_does_not_start_a_scrub_and_a_GET_of_scrub_is_refused()
    {
        await using ControlServer control = Start();
        using HttpClient http = StatusCommand.Client(SocketPath);

        string status = await http.GetStringAsync(new Uri("http://localhost/status"));
        using HttpResponseMessage getScrub = await http.GetAsync(new Uri("http://localhost/scrub"));

        Assert.That(status, Does.Contain("\"flushNumber\": 3"));
        Assert.That((int)getScrub.StatusCode, Is.EqualTo(405));
        Assert.That(_scrubs, Is.Zero);
    }

    [Test]
    public async Task Status_command_reads_the_socket_given_by_control()
    {
        await using ControlServer control = Start();
        var output = new StringWriter();
        TextWriter stdout = Console.Out;
        Console.SetOut(output);
        int code;
        try
        {
            code = await StatusCommand.RunAsync(["--control", SocketPath]);
        }
        finally
        {
            Console.SetOut(stdout);
        }

        Assert.That(code, Is.Zero);
        Assert.That(output.ToString(), Does.Contain("generation 7"));
    }

    [Test]
    public async Task Socket_file_is_removed_when_the_server_stops()
    {
        ControlServer control = Start();
        await control.DisposeAsync();

        Assert.That(File.Exists(SocketPath), Is.False);
    }

    [TestCase("127.0.0.1:10810")]
    [TestCase("[::1]:10810")]
    [TestCase("0.0.0.0:10810")]
    public void A_TCP_control_address_is_refused_at_start(string address) =>
        Assert.That(() => ServeCommand.Parse(["--control", address]),
            Throws.ArgumentException.With.Message.Contains("--control").And.Message.Contains("Unix socket"));

    [Test]
    public async Task Status_and_scrub_commands_refuse_a_TCP_control_address()
    {
        TextWriter stderr = Console.Error;
        Console.SetError(new StringWriter());
        try
        {
            Assert.That(await StatusCommand.RunAsync(["--control", "127.0.0.1:10810"]), Is.EqualTo(2));
            Assert.That(await StatusCommand.ScrubAsync(["--control", "127.0.0.1:10810"]), Is.EqualTo(2));
        }
        finally
        {
            Console.SetError(stderr);
        }
    }

    [Test]
    public void A_socket_path_is_accepted() =>
        Assert.That(ServeCommand.Parse(["--control", "/run/nbd-server/control.sock"]).Control, Is.EqualTo("/run/nbd-server/control.sock"));

    [Test]
    public async Task Requests_over_the_cap_do_not_wait_behind_silent_clients()
    {
        var limits = new NbdServer.Common.Hosting.LocalHttpLimits { MaxConnections = 1, Timeout = TimeSpan.FromMilliseconds(500) };
        await using var control = new ControlServer(SocketPath, () => Status, null, limits);
        control.Start();
        using var silent = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
        await silent.ConnectAsync(new UnixDomainSocketEndPoint(SocketPath));
        using HttpClient http = StatusCommand.Client(SocketPath);
        await Task.Delay(700);

        string status = await http.GetStringAsync(new Uri("http://localhost/status"));

        Assert.That(status, Does.Contain("\"generation\": 7"));
        Assert.That(await silent.ReceiveAsync(new byte[16], SocketFlags.None), Is.Zero, "the silent client was not closed at the deadline");
    }
}
