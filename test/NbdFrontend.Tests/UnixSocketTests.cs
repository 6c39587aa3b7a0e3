using System.Net.Sockets;
using NbdServer.Common.Volumes;
using NbdServer.Nbd;
using NbdServer.Frontend.Server;
using NbdServer.Frontend.Volumes;

namespace NbdServer.Frontend.Tests;

/// <summary>NBD over a Unix socket: permissions from the first moment, stale files, clean removal.</summary>
[CancelAfter(20_000)]
[System.Runtime.Versioning.UnsupportedOSPlatform("windows")]
public sealed class UnixSocketTests
{
    private string _dir = null!;
    private string _path = null!;
    private IBlockVolume _volume = null!;

    [SetUp]
    public void SetUp()
    {
        _dir = Directory.CreateTempSubdirectory("nbd-unix-").FullName;
        _path = Path.Combine(_dir, "nbd.sock");
        _volume = new MemoryVolume(16 << 20);
    }

    [TearDown]
    public async Task TearDown()
    {
        await _volume.DisposeAsync();
        Directory.Delete(_dir, recursive: true);
    }

    private NbdListener Listener(string mode = "0600") =>
        new(new ExportRegistry([new NbdExport("vol0", _volume)]), new FrontendOptions { Listen = null, UnixSocketPath = _path, UnixSocketMode = mode }, new CapturingLogger());

    [TestCase("0600", UnixFileMode.UserRead | UnixFileMode.UserWrite)]
    [TestCase("0660", UnixFileMode.UserRead | UnixFileMode.UserWrite | UnixFileMode.GroupRead | UnixFileMode.GroupWrite)]
    public async Task The_socket_has_the_configured_mode_serves_nbd_and_is_removed_at_stop(string mode, UnixFileMode expected)
    {
        await using (NbdListener listener = Listener(mode))
        {
            listener.Start();
            Assert.That(File.GetUnixFileMode(_path), Is.EqualTo(expected));
            await using NbdTestClient client = Connect();
            await client.ConnectAsync("vol0");
            await client.SendRequestAsync(NbdCommand.Write, 0, 512, cookie: 1, payload: Enumerable.Repeat((byte)3, 512).ToArray());
            Assert.That((await client.ReadSimpleReplyAsync()).Error, Is.EqualTo(NbdError.None));
            await client.SendRequestAsync(NbdCommand.Read, 0, 512, cookie: 2);
            Assert.That((await client.ReadSimpleReplyAsync(512)).Data, Is.All.EqualTo(3));
            await client.SendRequestAsync(NbdCommand.Disconnect, 0, 0);
            await listener.StopAsync();
        }
        Assert.That(Entries(), Does.Not.Contain("nbd.sock"));
    }

    [Test]
    public async Task A_stale_socket_left_by_a_crash_is_replaced()
    {
        // .NET unlinks a socket's file when the socket is disposed; a killed server does not. Moving
        // the file away first leaves what a crash leaves: a socket file nobody listens on.
        string bound = Path.Combine(_dir, "crashed.sock");
        using (var crashed = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified))
        {
            crashed.Bind(new UnixDomainSocketEndPoint(bound));
            crashed.Listen();
            File.Move(bound, _path);
        }
        Assert.That(Entries(), Does.Contain("nbd.sock"), "the stale socket file is there");
        await using NbdListener listener = Listener();
        listener.Start();
        await using NbdTestClient client = Connect();
        Assert.That((await client.ConnectAsync("vol0")).Size, Is.EqualTo(16UL << 20));
    }

    [Test]
    public async Task A_socket_another_server_is_serving_on_is_left_alone()
    {
        await using NbdListener first = Listener();
        first.Start();
        await using NbdListener second = Listener();
        Assert.That(() => second.Start(), Throws.InstanceOf<IOException>().With.Message.Contains("in use"));
        await using NbdTestClient client = Connect();
        Assert.That((await client.ConnectAsync("vol0")).Size, Is.EqualTo(16UL << 20), "the first server still serves");
    }

    [Test]
    public async Task A_regular_file_at_the_path_is_not_replaced()
    {
        await File.WriteAllTextAsync(_path, "not a socket");
        await using NbdListener listener = Listener();
        Assert.That(() => listener.Start(), Throws.InstanceOf<IOException>().With.Message.Contains("not a socket"));
        Assert.That(await File.ReadAllTextAsync(_path), Is.EqualTo("not a socket"));
    }

    private string[] Entries() => [.. new DirectoryInfo(_dir).GetFileSystemInfos().Select(f => f.Name)];

    [Test]
    public async Task Strangers_filling_the_tcp_connection_cap_do_not_lock_out_the_unix_socket()
    {
        await using var listener = new NbdListener(new ExportRegistry([new NbdExport("vol0", _volume)]),
            new FrontendOptions { Listen = new System.Net.IPEndPoint(System.Net.IPAddress.Loopback, 0), UnixSocketPath = _path, MaxConnections = 2 }, new CapturingLogger());
        listener.Start();
        var strangers = new List<Socket>();
        try
        {
            for (int i = 0; i < 4; i++)
            {
                var s = new Socket(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp);
                await s.ConnectAsync(listener.LocalEndPoint);
                strangers.Add(s);
            }
            Assert.That(() => listener.ConnectionCount, Is.EqualTo(2).After(5000).MilliSeconds.PollEvery(20).MilliSeconds, "TCP is at its cap");

            // The kernel client's way in still works.
            await using NbdTestClient client = Connect();
            Assert.That((await client.ConnectAsync("vol0")).Size, Is.EqualTo(16UL << 20));
        }
        finally
        {
            foreach (Socket s in strangers)
            {
                s.Dispose();
            }
        }
    }

    private NbdTestClient Connect()
    {
        var socket = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
        socket.Connect(new UnixDomainSocketEndPoint(_path));
        return new NbdTestClient(new NetworkStream(socket, ownsSocket: true));
    }
}
