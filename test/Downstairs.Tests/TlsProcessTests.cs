using System.Net;
using System.Net.Sockets;
using System.Security.Cryptography.X509Certificates;
using NbdServer.Common.Tls;
using NbdServer.Protocol;

namespace NbdServer.Downstairs.Tests;

/// <summary>The real nbd-downstairs process: secure by default, and mutual TLS from a TLS directory.</summary>
[CancelAfter(90_000)]
public sealed class TlsProcessTests
{
    private TempDir _dir = null!;
    private string _region = null!;

    [SetUp]
    public async Task SetUp()
    {
        _dir = new TempDir();
        _region = _dir.Sub("r");
        (int code, _, string err) = await DownstairsProcess.RunToolAsync("create", "--data", _region, "--size", "4MiB");
        Assert.That(code, Is.EqualTo(0), err);
    }

    [TearDown]
    public void TearDown() => _dir.Dispose();

    [Test]
    public async Task Plaintext_on_a_non_loopback_address_refuses_to_start_naming_the_fix()
    {
        (int code, string stdout, string err) = await DownstairsProcess.RunToolAsync("run", "--data", _region, "--listen", "0.0.0.0:0");
        Assert.That(code, Is.EqualTo(2), stdout + err);
        Assert.That(err, Does.Contain("0.0.0.0:0 is not a loopback address").And.Contain("--tls-dir").And.Contain("--insecure"));
        Assert.That(err.Trim().Split('\n'), Has.Length.EqualTo(1), "one clear line");
    }

    [Test]
    public void Plaintext_on_a_non_loopback_address_is_accepted_with_insecure()
    {
        // Checked on the settings rather than by starting a process: tests listen on loopback only.
        var insecure = new Server.DownstairsOptions { DataDir = _region, Listen = new IPEndPoint(IPAddress.Any, 0), Insecure = true };
        Assert.That(insecure.Validate, Throws.Nothing);
        Assert.That(() => (insecure with { Insecure = false }).Validate(), Throws.ArgumentException.With.Message.Contains("--insecure"));
        Assert.That(() => (insecure with { Insecure = false, TlsDir = "/etc/nbd-server/tls" }).Validate(), Throws.Nothing);
        Assert.That(() => (insecure with { Insecure = false, Listen = new IPEndPoint(IPAddress.IPv6Loopback, 0) }).Validate(), Throws.Nothing);
    }

    [Test]
    public async Task A_missing_key_file_refuses_to_start_naming_it()
    {
        string tls = MakeTlsDirectories(out _);
        File.Delete(Path.Combine(tls, TlsFiles.ServerKey));
        (int code, _, string err) = await DownstairsProcess.RunToolAsync("run", "--data", _region, "--listen", "0.0.0.0:0", "--tls-dir", tls);
        Assert.That(code, Is.EqualTo(2), err);
        Assert.That(err, Does.Contain("server-key.pem"));
    }

    [Test]
    public async Task With_tls_dir_the_upstairs_is_served_and_a_plaintext_hello_gets_nothing()
    {
        string tls = MakeTlsDirectories(out string upstairs);
        await using DownstairsProcess ds = await DownstairsProcess.StartAsync(_region, ["--tls-dir", tls, "--tls-allow-client", "upstairs"]);
        IPEndPoint endpoint = ds.Endpoint;

        // A stranger's read-only Hello in plaintext: no reply frame.
        using (var socket = new Socket(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp))
        {
            await socket.ConnectAsync(endpoint);
            OutgoingFrame hello = new HelloRequest(Wire.ProtocolVersion, true, Guid.Empty, Guid.NewGuid(), Guid.NewGuid(), 0).Encode();
            await socket.SendAsync(hello.Prefix.AsMemory(0, hello.PrefixLength));
            hello.ReturnPrefix();
            byte[] buffer = new byte[4096];
            int total = 0;
            try
            {
                using var deadline = new CancellationTokenSource(TimeSpan.FromSeconds(20));
                int n;
                while ((n = await socket.ReceiveAsync(buffer.AsMemory(total), SocketFlags.None, deadline.Token)) > 0 && total < buffer.Length)
                {
                    total += n;
                }
            }
            catch (SocketException)
            {
            }
            var bytes = new System.Buffers.ReadOnlySequence<byte>(buffer, 0, total);
            Assert.That(FrameReader.TryRead(ref bytes, Wire.DefaultMaxFrameBytes, out _, out _), Is.False, "no frame came back");
        }

        using TlsCredentials credentials = TlsCredentials.LoadClient(upstairs);
        await using DownstairsClient client = await DownstairsClient.ConnectAsync(endpoint,
            new HelloRequest(Wire.ProtocolVersion, false, Guid.Empty, Guid.NewGuid(), Guid.NewGuid(), 3),
            new DownstairsClientOptions { Tls = new TlsClientPolicy(credentials) });
        byte[] block = TestData.Block(4096, 7, 1);
        Assert.That((await client.WriteAsync(1, 7, block)).IsOk, Is.True);
        byte[] back = new byte[4096];
        Assert.That((await client.ReadAsync(2, 7, back)).IsOk, Is.True);
        Assert.That(back, Is.EqualTo(block));
    }

    [Test]
    public async Task By_default_only_the_upstairs_certificate_gets_in_not_an_nbd_client_of_the_same_ca()
    {
        string tls = MakeTlsDirectories(out string upstairs, alsoClient: "kernel");
        await using DownstairsProcess ds = await DownstairsProcess.StartAsync(_region, ["--tls-dir", tls]);

        // The CA also issued the host's NBD client certificate; with it, a local user could fence the upstairs.
        using (TlsCredentials kernel = TlsCredentials.LoadClient(_dir.Sub("tls-kernel")))
        {
            Assert.That(async () => await DownstairsClient.ConnectAsync(ds.Endpoint,
                    new HelloRequest(Wire.ProtocolVersion, false, Guid.Empty, Guid.NewGuid(), Guid.NewGuid(), 9),
                    new DownstairsClientOptions { Tls = new TlsClientPolicy(kernel) }),
                Throws.InstanceOf<Exception>());
        }

        using TlsCredentials credentials = TlsCredentials.LoadClient(upstairs);
        await using DownstairsClient client = await DownstairsClient.ConnectAsync(ds.Endpoint,
            new HelloRequest(Wire.ProtocolVersion, false, Guid.Empty, Guid.NewGuid(), Guid.NewGuid(), 3),
            new DownstairsClientOptions { Tls = new TlsClientPolicy(credentials) });
        Assert.That(client.Region.HighestGeneration, Is.EqualTo(3UL), "the refused writer's generation 9 was never recorded: the highest is the upstairs' own 3");
    }

    /// <summary>A CA, a server directory for 127.0.0.1 and an upstairs client directory; returns the server's.</summary>
    private string MakeTlsDirectories(out string upstairs, string? alsoClient = null)
    {
        DateTimeOffset now = DateTimeOffset.UtcNow;
        using X509Certificate2 ca = TlsCertificates.CreateCa("test CA", CertificateValidity.Starting(now, TimeSpan.FromDays(30)));
        using X509Certificate2 server = TlsCertificates.CreateServer(ca, "ds", [], [IPAddress.Loopback], CertificateValidity.Starting(now, TimeSpan.FromDays(10)));
        using X509Certificate2 client = TlsCertificates.CreateClient(ca, "upstairs", CertificateValidity.Starting(now, TimeSpan.FromDays(10)));
        string serverDir = _dir.Sub("tls-ds");
        upstairs = _dir.Sub("tls-up");
        TlsCertificates.WriteServer(serverDir, ca, server, overwrite: false);
        TlsCertificates.WriteClient(upstairs, ca, client, overwrite: false);
        if (alsoClient is not null)
        {
            using X509Certificate2 other = TlsCertificates.CreateClient(ca, alsoClient, CertificateValidity.Starting(now, TimeSpan.FromDays(10)));
            TlsCertificates.WriteClient(_dir.Sub($"tls-{alsoClient}"), ca, other, overwrite: false);
        }
        return serverDir;
    }
}
