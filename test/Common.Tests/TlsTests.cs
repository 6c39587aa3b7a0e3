using System.Net;
using System.Net.Security;
using System.Net.Sockets;
using System.Security.Authentication;
using System.Security.Cryptography.X509Certificates;
using NbdServer.Common.Tls;

namespace NbdServer.Common.Tests;

[System.Runtime.Versioning.SupportedOSPlatform("linux")]
public sealed class TlsTests
{
    private static readonly DateTimeOffset Now = DateTimeOffset.UtcNow;
    private static readonly CertificateValidity Year = CertificateValidity.Starting(Now, TlsCertificates.DefaultLeafLifetime);

    private X509Certificate2 _ca = null!;
    private X509Certificate2 _otherCa = null!;
    private X509Certificate2 _server = null!;
    private X509Certificate2 _client = null!;
    private string _dir = null!;

    [OneTimeSetUp]
    public void MakePki()
    {
        // Started in the past so an already expired leaf can be issued by it.
        _ca = TlsCertificates.CreateCa("test CA", new CertificateValidity(Now.AddDays(-60), Now.AddDays(3650)));
        _otherCa = TlsCertificates.CreateCa("test CA", CertificateValidity.Starting(Now, TlsCertificates.DefaultCaLifetime));
        _server = TlsCertificates.CreateServer(_ca, "s1", ["s1.example", "*.pool.example"], [IPAddress.Parse("10.0.0.2"), IPAddress.Loopback], Year);
        _client = TlsCertificates.CreateClient(_ca, "upstairs", Year);
    }

    [OneTimeTearDown]
    public void DisposePki()
    {
        _ca.Dispose();
        _otherCa.Dispose();
        _server.Dispose();
        _client.Dispose();
    }

    [SetUp]
    public void SetUp() => _dir = Path.Combine(Path.GetTempPath(), $"tls-{Guid.NewGuid():N}");

    [TearDown]
    public void TearDown()
    {
        if (Directory.Exists(_dir))
        {
            Directory.Delete(_dir, recursive: true);
        }
    }

    private X509Certificate2Collection Trust => [_ca];

    [Test]
    public void Certificates_from_our_ca_verify_for_their_own_role()
    {
        Assert.That(TlsPeerVerifier.CheckChain(_server, Trust, TlsPeerRole.Server, Now), Is.Null);
        Assert.That(TlsPeerVerifier.CheckChain(_client, Trust, TlsPeerRole.Client, Now), Is.Null);
    }

    [Test]
    public void A_server_certificate_is_refused_as_a_client_certificate()
    {
        Assert.That(TlsPeerVerifier.CheckChain(_server, Trust, TlsPeerRole.Client, Now), Does.Contain("not for use by a TLS client"));
    }

    [Test]
    public void A_certificate_from_another_ca_with_the_same_name_is_refused()
    {
        using X509Certificate2 stranger = TlsCertificates.CreateClient(_otherCa, "upstairs", Year);
        Assert.That(TlsPeerVerifier.CheckChain(stranger, Trust, TlsPeerRole.Client, Now), Does.Contain("not issued by the CA in ca-cert.pem"));
    }

    [Test]
    public void An_expired_certificate_is_refused_with_its_expiry_date()
    {
        using X509Certificate2 expired = TlsCertificates.CreateClient(_ca, "upstairs", new CertificateValidity(Now.AddDays(-30), Now.AddDays(-1)));
        Assert.That(TlsPeerVerifier.CheckChain(expired, Trust, TlsPeerRole.Client, Now), Does.Contain("expired on"));
    }

    [Test]
    public void A_certificate_not_yet_valid_is_refused()
    {
        using X509Certificate2 future = TlsCertificates.CreateClient(_ca, "upstairs", new CertificateValidity(Now.AddDays(1), Now.AddDays(30)));
        Assert.That(TlsPeerVerifier.CheckChain(future, Trust, TlsPeerRole.Client, Now), Does.Contain("not valid before"));
    }

    [Test]
    public void Leaf_validity_is_cut_to_the_ca_validity()
    {
        using X509Certificate2 shortCa = TlsCertificates.CreateCa("short", CertificateValidity.Starting(Now, TimeSpan.FromDays(10)));
        using X509Certificate2 leaf = TlsCertificates.CreateClient(shortCa, "u", Year);
        Assert.That(leaf.NotAfter, Is.LessThanOrEqualTo(shortCa.NotAfter));
    }

    [TestCase("s1.example", true)]
    [TestCase("S1.EXAMPLE", true)]
    [TestCase("a.pool.example", true)]
    [TestCase("10.0.0.2", true)]
    [TestCase("127.0.0.1", true)]
    [TestCase("s1", false)] // the common name alone does not count
    [TestCase("s2.example", false)]
    [TestCase("10.0.0.3", false)]
    [TestCase("a.b.pool.example", false)]
    public void Server_name_must_match_a_dns_or_ip_alternative_name(string expected, bool matches)
    {
        Assert.That(TlsPeerVerifier.CheckServerName(_server, expected) is null, Is.EqualTo(matches));
    }

    [Test]
    public void A_pin_matches_only_its_own_certificate()
    {
        Assert.That(TlsPeerVerifier.TryParsePin(TlsPeerVerifier.Fingerprint(_server), out byte[] pin), Is.True);
        Assert.That(TlsPeerVerifier.CheckPin(_server, pin), Is.Null);
        Assert.That(TlsPeerVerifier.CheckPin(_client, pin), Does.Contain("not the pinned one"));
    }

    [TestCase("sha256:" + "AB", false)]
    [TestCase("zz", false)]
    [TestCase("", false)]
    public void Malformed_pins_are_refused(string text, bool ok)
    {
        Assert.That(TlsPeerVerifier.TryParsePin(text, out _), Is.EqualTo(ok));
    }

    [Test]
    public void Pins_are_accepted_with_or_without_colons_and_prefix()
    {
        string hex = TlsPeerVerifier.Fingerprint(_server);
        Assert.That(TlsPeerVerifier.TryParsePin(hex.Replace(":", "", StringComparison.Ordinal).ToLowerInvariant(), out byte[] a), Is.True);
        Assert.That(TlsPeerVerifier.TryParsePin("sha256:" + hex, out byte[] b), Is.True);
        Assert.That(a, Is.EqualTo(b));
    }

    [Test]
    public void The_client_allowlist_matches_the_common_name()
    {
        Assert.That(TlsPeerVerifier.CheckAllowed(_client, ["upstairs"]), Is.Null);
        Assert.That(TlsPeerVerifier.CheckAllowed(_client, []), Is.Null);
        Assert.That(TlsPeerVerifier.CheckAllowed(_client, ["other"]), Does.Contain("not in the allowed client list"));
    }

    [Test]
    public void A_forged_name_cannot_inject_log_lines()
    {
        using X509Certificate2 forged = TlsCertificates.CreateClient(_otherCa, "evil\n12:00:00 INF all is well", Year);
        Assert.That(TlsPeerVerifier.Describe(forged), Is.EqualTo("'evil?12:00:00 INF all is well'"));
        using X509Certificate2 huge = TlsCertificates.CreateClient(_otherCa, new string('x', 1000), Year);
        Assert.That(TlsPeerVerifier.Describe(huge), Has.Length.LessThan(140));
    }

    [Test]
    public void Written_directories_load_back_and_keys_are_private()
    {
        TlsCertificates.WriteServer(_dir, _ca, _server, overwrite: false);
        TlsCertificates.WriteClient(_dir, _ca, _client, overwrite: false);
        Assert.That(File.GetUnixFileMode(Path.Combine(_dir, TlsFiles.ServerKey)), Is.EqualTo(UnixFileMode.UserRead | UnixFileMode.UserWrite));
        Assert.That(File.GetUnixFileMode(Path.Combine(_dir, TlsFiles.ClientKey)), Is.EqualTo(UnixFileMode.UserRead | UnixFileMode.UserWrite));
        Assert.That(File.GetUnixFileMode(_dir), Is.EqualTo(UnixFileMode.UserRead | UnixFileMode.UserWrite | UnixFileMode.UserExecute));
        Assert.That(Directory.GetFiles(_dir).Select(Path.GetFileName), Is.EquivalentTo(new[] { "ca-cert.pem", "server-cert.pem", "server-key.pem", "client-cert.pem", "client-key.pem" }));
        using TlsCredentials server = TlsCredentials.LoadServer(_dir);
        using TlsCredentials client = TlsCredentials.LoadClient(_dir);
        Assert.That(server.Certificate!.HasPrivateKey, Is.True);
        Assert.That(server.Certificate.Thumbprint, Is.EqualTo(_server.Thumbprint));
        Assert.That(client.Certificate!.Thumbprint, Is.EqualTo(_client.Thumbprint));
        Assert.That(client.TrustedCas[0].Thumbprint, Is.EqualTo(_ca.Thumbprint));
    }

    [Test]
    public void A_ca_directory_round_trips_and_signs()
    {
        TlsCertificates.WriteCa(_dir, _ca, overwrite: false);
        Assert.That(File.GetUnixFileMode(Path.Combine(_dir, TlsFiles.CaKey)), Is.EqualTo(UnixFileMode.UserRead | UnixFileMode.UserWrite));
        using X509Certificate2 ca = TlsCertificates.LoadCa(_dir);
        using X509Certificate2 leaf = TlsCertificates.CreateClient(ca, "x", Year);
        Assert.That(TlsPeerVerifier.CheckChain(leaf, Trust, TlsPeerRole.Client, Now), Is.Null);
    }

    [Test]
    public void Existing_files_and_a_different_ca_are_not_replaced_without_overwrite()
    {
        TlsCertificates.WriteServer(_dir, _ca, _server, overwrite: false);
        Assert.That(() => TlsCertificates.WriteServer(_dir, _ca, _server, overwrite: false), Throws.TypeOf<TlsSetupException>().With.Message.Contains("already exists"));
        using X509Certificate2 other = TlsCertificates.CreateClient(_otherCa, "u", Year);
        Assert.That(() => TlsCertificates.WriteClient(_dir, _otherCa, other, overwrite: false), Throws.TypeOf<TlsSetupException>().With.Message.Contains("different CA"));
    }

    [Test]
    public void Loading_names_the_missing_file()
    {
        TlsCertificates.WriteServer(_dir, _ca, _server, overwrite: false);
        Assert.That(() => TlsCredentials.LoadClient(_dir), Throws.TypeOf<TlsSetupException>().With.Message.Contains("client-cert.pem"));
        File.Delete(Path.Combine(_dir, TlsFiles.CaCert));
        Assert.That(() => TlsCredentials.LoadServer(_dir), Throws.TypeOf<TlsSetupException>().With.Message.Contains("ca-cert.pem"));
        Assert.That(() => TlsCredentials.LoadServer(Path.Combine(_dir, "nope")), Throws.TypeOf<TlsSetupException>().With.Message.Contains("does not exist"));
    }

    [Test]
    public void A_key_that_does_not_match_its_certificate_is_a_clear_error()
    {
        TlsCertificates.WriteServer(_dir, _ca, _server, overwrite: false);
        TlsCertificates.WriteClient(_dir, _ca, _client, overwrite: false);
        File.Copy(Path.Combine(_dir, TlsFiles.ClientKey), Path.Combine(_dir, TlsFiles.ServerKey), overwrite: true);
        Assert.That(() => TlsCredentials.LoadServer(_dir), Throws.TypeOf<TlsSetupException>().With.Message.Contains("server-cert.pem"));
    }

    [Test, CancelAfter(20_000)]
    public async Task Downstairs_link_negotiates_tls13_aes128_gcm_when_the_server_prefers_it()
    {
        (SslStream server, SslStream client) = await Handshake(_client, "127.0.0.1", preferAes128: true);
        await using (server)
        await using (client)
        {
            Assert.That(server.SslProtocol, Is.EqualTo(SslProtocols.Tls13));
            Assert.That(server.NegotiatedCipherSuite, Is.EqualTo(TlsCipherSuite.TLS_AES_128_GCM_SHA256));
            Assert.That(client.NegotiatedCipherSuite, Is.EqualTo(TlsCipherSuite.TLS_AES_128_GCM_SHA256));
        }
    }

    [Test, CancelAfter(20_000)]
    public async Task A_server_without_the_aes128_preference_keeps_the_platform_choice()
    {
        // The NBD frontend's policy: clients such as GnuTLS keep whatever the platform negotiates.
        (SslStream server, SslStream client) = await Handshake(_client, "127.0.0.1", preferAes128: false);
        await using (server)
        await using (client)
        {
            Assert.That(server.NegotiatedCipherSuite, Is.EqualTo(TlsCipherSuite.TLS_AES_256_GCM_SHA384));
        }
    }

    [Test, CancelAfter(20_000)]
    public async Task Mutual_tls_handshake_succeeds_with_certificates_from_our_ca()
    {
        (SslStream server, SslStream client) = await Handshake(_client, "127.0.0.1", allowed: ["upstairs"]);
        await using (server)
        await using (client)
        {
            await client.WriteAsync(new byte[] { 42 });
            byte[] one = new byte[1];
            await server.ReadExactlyAsync(one);
            Assert.That(one[0], Is.EqualTo(42));
            Assert.That(server.RemoteCertificate!.Subject, Does.Contain("upstairs"));
        }
    }

    [Test, CancelAfter(20_000)]
    public void A_client_without_a_certificate_is_refused_by_the_server()
    {
        var e = Assert.ThrowsAsync<TlsHandshakeException>(() => Handshake(null, "127.0.0.1"));
        Assert.That(e!.Message, Does.Contain("no certificate"));
    }

    [Test, CancelAfter(20_000)]
    public void A_client_from_another_ca_is_refused_by_the_server()
    {
        using X509Certificate2 stranger = TlsCertificates.CreateClient(_otherCa, "upstairs", Year);
        var e = Assert.ThrowsAsync<TlsHandshakeException>(() => Handshake(stranger, "127.0.0.1"));
        Assert.That(e!.Message, Does.Contain("not issued by the CA"));
    }

    [Test, CancelAfter(20_000)]
    public void A_client_not_on_the_allowlist_is_refused_by_the_server()
    {
        using X509Certificate2 other = TlsCertificates.CreateClient(_ca, "intruder", Year);
        var e = Assert.ThrowsAsync<TlsHandshakeException>(() => Handshake(other, "127.0.0.1", allowed: ["upstairs"]));
        Assert.That(e!.Message, Does.Contain("not in the allowed client list"));
    }

    [Test, CancelAfter(20_000)]
    public void A_server_with_the_wrong_name_is_refused_by_the_client()
    {
        var e = Assert.ThrowsAsync<TlsHandshakeException>(() => Handshake(_client, "s9.example"));
        Assert.That(e!.Message, Does.Contain("is not for 's9.example'"));
    }

    [Test, CancelAfter(20_000)]
    public void A_plaintext_peer_does_not_complete_the_handshake()
    {
        var e = Assert.ThrowsAsync<TlsHandshakeException>(async () =>
        {
            using var listener = new Socket(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp);
            listener.Bind(new IPEndPoint(IPAddress.Loopback, 0));
            listener.Listen();
            using var plain = new Socket(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp);
            await plain.ConnectAsync(listener.LocalEndPoint!);
            Socket accepted = await listener.AcceptAsync();
            await plain.SendAsync(new byte[64]);
            using var credentials = TlsCredentials.FromCertificates([_ca], _server);
            await new TlsServerPolicy(credentials, requireClientCertificate: true).AuthenticateAsync(new NetworkStream(accepted, ownsSocket: true), TimeSpan.FromSeconds(5), CancellationToken.None);
        });
        Assert.That(e!.Message, Does.StartWith("TLS handshake failed").Or.StartWith("connection closed"));
    }

    [Test, CancelAfter(20_000)]
    public void A_silent_peer_is_dropped_at_the_handshake_deadline()
    {
        var e = Assert.ThrowsAsync<TlsHandshakeException>(async () =>
        {
            using var listener = new Socket(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp);
            listener.Bind(new IPEndPoint(IPAddress.Loopback, 0));
            listener.Listen();
            using var silent = new Socket(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp);
            await silent.ConnectAsync(listener.LocalEndPoint!);
            Socket accepted = await listener.AcceptAsync();
            using var credentials = TlsCredentials.FromCertificates([_ca], _server);
            await new TlsServerPolicy(credentials, requireClientCertificate: true).AuthenticateAsync(new NetworkStream(accepted, ownsSocket: true), TimeSpan.FromMilliseconds(200), CancellationToken.None);
        });
        Assert.That(e!.Message, Does.Contain("not completed within 0.2 s"));
    }

    /// <summary>Runs both sides over loopback TCP; throws the first side's <see cref="TlsHandshakeException"/> (server first).</summary>
    private async Task<(SslStream Server, SslStream Client)> Handshake(X509Certificate2? clientCertificate, string expectedName, IReadOnlyCollection<string>? allowed = null, bool preferAes128 = false)
    {
        using var listener = new Socket(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp);
        listener.Bind(new IPEndPoint(IPAddress.Loopback, 0));
        listener.Listen();
        var clientSocket = new Socket(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp);
        await clientSocket.ConnectAsync(listener.LocalEndPoint!);
        Socket serverSocket = await listener.AcceptAsync();
        var serverCredentials = TlsCredentials.FromCertificates([_ca], _server);
        var clientCredentials = TlsCredentials.FromCertificates([_ca], clientCertificate);
        var serverPolicy = new TlsServerPolicy(serverCredentials, requireClientCertificate: true, allowed) { PreferAes128 = preferAes128 };
        var clientPolicy = new TlsClientPolicy(clientCredentials);
        Task<SslStream> server = serverPolicy.AuthenticateAsync(new NetworkStream(serverSocket, ownsSocket: true), TimeSpan.FromSeconds(10), CancellationToken.None);
        Task<SslStream> client = clientPolicy.AuthenticateAsync(new NetworkStream(clientSocket, ownsSocket: true), expectedName, TimeSpan.FromSeconds(10), CancellationToken.None);
        try
        {
            await Task.WhenAll(server, client);
        }
        catch (TlsHandshakeException)
        {
            // A refusal on one side shows on the other as a closed connection; the refusing side's reason is the one to check.
            if (server.IsFaulted && server.Exception!.InnerException is TlsHandshakeException { } s && s.Message.Contains("certificate", StringComparison.Ordinal))
            {
                throw s;
            }
            if (client.IsFaulted)
            {
                throw client.Exception!.InnerException!;
            }
            throw server.Exception!.InnerException!;
        }
        return (server.Result, client.Result);
    }
}
