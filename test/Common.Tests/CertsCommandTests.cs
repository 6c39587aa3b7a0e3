using System.Net;
using System.Net.Security;
using System.Net.Sockets;
using NbdServer.Common.Tls;
using NbdServer.Tools.Certs;

namespace NbdServer.Common.Tests;

[System.Runtime.Versioning.SupportedOSPlatform("linux")]
public sealed class CertsCommandTests
{
    private string _dir = null!;

    [SetUp]
    public void SetUp() => _dir = Path.Combine(Path.GetTempPath(), $"nbd-certs-{Guid.NewGuid():N}");

    [TearDown]
    public void TearDown()
    {
        if (Directory.Exists(_dir))
        {
            Directory.Delete(_dir, recursive: true);
        }
    }

    private static (int Code, string Out, string Err) Run(params string[] args)
    {
        var stdout = new StringWriter();
        var stderr = new StringWriter();
        int code = CertsCommand.Run(args, stdout, stderr, TimeProvider.System);
        return (code, stdout.ToString(), stderr.ToString());
    }

    [TestCase]
    [TestCase("bogus")]
    [TestCase("ca")]
    [TestCase("server", "--ca", "x", "--out", "y")]
    [TestCase("client", "--ca", "x", "--name", "u", "--out", "y", "--ip", "10.0.0.1")]
    [TestCase("ca", "--dir", "x", "--days", "0")]
    [TestCase("server", "--ca", "x", "--name", "s", "--out", "y", "--ip", "not-an-ip")]
    [TestCase("ca", "--dir", "x", "--dir", "y")]
    public void Bad_usage_exits_2_with_a_message(params string[] args)
    {
        (int code, _, string err) = Run(args);
        Assert.That(code, Is.EqualTo(CertsCommand.BadUsage));
        Assert.That(err, Does.Contain("nbd-certs"));
    }

    [Test]
    public void Help_exits_0()
    {
        (int code, string output, _) = Run("--help");
        Assert.That(code, Is.EqualTo(CertsCommand.Ok));
        Assert.That(output, Does.Contain("nbd-certs ca").Or.Contain("ca --dir DIR"));
    }

    [Test, CancelAfter(30_000)]
    public async Task The_directories_it_writes_authenticate_a_server_and_a_client()
    {
        string ca = Path.Combine(_dir, "ca");
        string s1 = Path.Combine(_dir, "s1");
        string up = Path.Combine(_dir, "upstairs");
        Assert.That(Run("ca", "--dir", ca).Code, Is.EqualTo(CertsCommand.Ok));
        (int serverCode, string serverOut, _) = Run("server", "--ca", ca, "--name", "s1.example", "--ip", "127.0.0.1", "--out", s1, "--days", "30");
        Assert.That(serverCode, Is.EqualTo(CertsCommand.Ok));
        Assert.That(serverOut, Does.Contain("SHA-256 fingerprint"));
        Assert.That(Run("client", "--ca", ca, "--name", "upstairs", "--out", up).Code, Is.EqualTo(CertsCommand.Ok));
        Assert.That(File.GetUnixFileMode(Path.Combine(s1, TlsFiles.ServerKey)), Is.EqualTo(UnixFileMode.UserRead | UnixFileMode.UserWrite));
        Assert.That(File.Exists(Path.Combine(s1, TlsFiles.CaKey)), Is.False, "the CA key stays in the CA directory");

        using TlsCredentials serverCredentials = TlsCredentials.LoadServer(s1);
        using TlsCredentials clientCredentials = TlsCredentials.LoadClient(up);
        Assert.That(serverCredentials.Certificate!.NotAfter, Is.LessThan(DateTime.UtcNow.AddDays(31)));
        using var listener = new Socket(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp);
        listener.Bind(new IPEndPoint(IPAddress.Loopback, 0));
        listener.Listen();
        var clientSocket = new Socket(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp);
        await clientSocket.ConnectAsync(listener.LocalEndPoint!);
        Socket serverSocket = await listener.AcceptAsync();
        Task<SslStream> server = new TlsServerPolicy(serverCredentials, requireClientCertificate: true, ["upstairs"])
            .AuthenticateAsync(new NetworkStream(serverSocket, ownsSocket: true), TimeSpan.FromSeconds(10), CancellationToken.None);
        Task<SslStream> client = new TlsClientPolicy(clientCredentials)
            .AuthenticateAsync(new NetworkStream(clientSocket, ownsSocket: true), "127.0.0.1", TimeSpan.FromSeconds(10), CancellationToken.None);
        await using SslStream s = await server;
        await using SslStream c = await client;
        Assert.That(s.IsMutuallyAuthenticated, Is.True);
    }

    [Test]
    public void Show_prints_the_fingerprint_used_as_a_pin()
    {
        string ca = Path.Combine(_dir, "ca");
        string s1 = Path.Combine(_dir, "s1");
        Run("ca", "--dir", ca);
        Run("server", "--ca", ca, "--name", "s1", "--dns", "s1.example", "--out", s1);
        (int code, string output, _) = Run("show", s1);
        using TlsCredentials credentials = TlsCredentials.LoadServer(s1);
        Assert.That(code, Is.EqualTo(CertsCommand.Ok));
        Assert.That(output, Does.Contain(TlsPeerVerifier.Fingerprint(credentials.Certificate!)));
        Assert.That(output, Does.Contain("s1.example"));
    }

    [Test]
    public void A_missing_ca_key_fails_with_exit_1_naming_it()
    {
        (int code, _, string err) = Run("client", "--ca", Path.Combine(_dir, "none"), "--name", "u", "--out", Path.Combine(_dir, "u"));
        Assert.That(code, Is.EqualTo(CertsCommand.Failed));
        Assert.That(err, Does.Contain("ca-cert.pem"));
    }
}
