using System.Net;
using System.Net.Security;
using System.Security.Authentication;
using System.Security.Cryptography.X509Certificates;
using System.Text;
using NbdServer.Common.Tls;
using NbdServer.Nbd;
using NbdServer.Frontend.Server;
using static NbdServer.Frontend.Tests.NbdTestClient;

namespace NbdServer.Frontend.Tests;

/// <summary>
/// NBD_OPT_STARTTLS haggling (proto.md "TLS support"): FORCEDTLS with tls require, SELECTIVETLS with
/// tls on, NOTLS with tls off; the upgrade itself over an in-process stream with real certificates.
/// </summary>
[CancelAfter(20_000)]
public sealed class StartTlsTests
{
    private static X509Certificate2 _ca = null!;
    private static X509Certificate2 _server = null!;
    private static X509Certificate2 _client = null!;
    private static X509Certificate2 _strangerClient = null!;

    [OneTimeSetUp]
    public static void MakeCertificates()
    {
        CertificateValidity validity = CertificateValidity.Starting(DateTimeOffset.UtcNow, TimeSpan.FromDays(1));
        _ca = TlsCertificates.CreateCa("test ca", validity);
        _server = TlsCertificates.CreateServer(_ca, "nbd-server", ["localhost"], [IPAddress.Loopback], validity);
        _client = TlsCertificates.CreateClient(_ca, "kernel", validity);
        using X509Certificate2 otherCa = TlsCertificates.CreateCa("another ca", validity);
        _strangerClient = TlsCertificates.CreateClient(otherCa, "kernel", validity);
    }

    [OneTimeTearDown]
    public static void DisposeCertificates()
    {
        _ca.Dispose();
        _server.Dispose();
        _client.Dispose();
        _strangerClient.Dispose();
    }

    private static TestServer Server(TlsMode mode, bool verifyClient = false, TimeSpan? handshakeTimeout = null)
    {
        var options = new FrontendOptions { Tls = mode, TlsDir = "(in memory)", TlsVerifyClient = verifyClient, HandshakeTimeout = handshakeTimeout ?? TimeSpan.FromSeconds(30) };
        TlsServerPolicy? policy = mode == TlsMode.Off ? null
            : new TlsServerPolicy(TlsCredentials.FromCertificates([_ca], _server), verifyClient) { CoalesceWrites = true };
        return new TestServer(options, policy);
    }

    [TestCase(3u, TestName = "Require_answers_LIST_with_ERR_TLS_REQD")]
    [TestCase(8u, TestName = "Require_answers_STRUCTURED_REPLY_with_ERR_TLS_REQD")]
    [TestCase(6u, TestName = "Require_answers_INFO_with_ERR_TLS_REQD")]
    [TestCase(7u, TestName = "Require_answers_GO_with_ERR_TLS_REQD")]
    [TestCase(10u, TestName = "Require_answers_SET_META_CONTEXT_with_ERR_TLS_REQD")]
    public async Task Require_answers_every_option_but_starttls_and_abort_with_ERR_TLS_REQD(uint code)
    {
        var option = (NbdOption)code;
        await using TestServer server = Server(TlsMode.Require);
        await using NbdTestClient client = server.Connect();
        await client.StartAsync();
        byte[] data = option is NbdOption.Info or NbdOption.Go ? InfoRequest("vol0") : option == NbdOption.SetMetaContext ? MetaContextRequest("vol0", "base:allocation") : [];
        await client.SendOptionAsync(option, data);
        OptionReply reply = await client.ReadOptionReplyAsync();
        Assert.That((reply.Option, reply.Type), Is.EqualTo((option, OptionReplyType.ErrTlsRequired)));

        await client.SendOptionAsync(NbdOption.Abort, []);
        Assert.That((await client.ReadOptionReplyAsync()).Type, Is.EqualTo(OptionReplyType.Ack), "ABORT is still answered");
    }

    [Test]
    public async Task Require_ends_the_session_on_export_name_before_tls_and_serves_nothing()
    {
        await using TestServer server = Server(TlsMode.Require);
        await using NbdTestClient client = server.Connect();
        await client.StartAsync();
        await client.SendOptionAsync(NbdOption.ExportName, Encoding.UTF8.GetBytes("vol0"));
        Assert.That(await client.IsClosedAsync(), Is.True);
        Assert.That(server.Logger.Warnings.Count(w => w.Contains("NBD_OPT_EXPORT_NAME without TLS", StringComparison.Ordinal)), Is.EqualTo(1));
    }

    [Test]
    public async Task Starttls_upgrades_the_stream_and_the_export_is_served_over_tls()
    {
        await using TestServer server = Server(TlsMode.Require);
        await using NbdTestClient plain = server.Connect();
        await plain.StartAsync();
        await using NbdTestClient client = await StartTlsAsync(plain, null);

        await client.SendOptionAsync(NbdOption.Go, InfoRequest("vol0"));
        Assert.That((await client.ReadOptionRepliesAsync())[^1].Type, Is.EqualTo(OptionReplyType.Ack));
        byte[] data = Enumerable.Range(0, 65536).Select(i => (byte)(i * 7)).ToArray();
        await client.SendRequestAsync(NbdCommand.Write, 4096, (uint)data.Length, cookie: 1, payload: data);
        Assert.That((await client.ReadSimpleReplyAsync()).Error, Is.EqualTo(NbdError.None));
        await client.SendRequestAsync(NbdCommand.Read, 4096, (uint)data.Length, cookie: 2);
        Assert.That((await client.ReadSimpleReplyAsync(data.Length)).Data, Is.EqualTo(data));
    }

    [Test]
    public async Task Starttls_twice_is_ERR_INVALID_and_the_session_continues()
    {
        await using TestServer server = Server(TlsMode.On);
        await using NbdTestClient plain = server.Connect();
        await plain.StartAsync();
        await using NbdTestClient client = await StartTlsAsync(plain, null);
        await client.SendOptionAsync(NbdOption.StartTls, []);
        Assert.That((await client.ReadOptionReplyAsync()).Type, Is.EqualTo(OptionReplyType.ErrInvalid));
        await client.SendOptionAsync(NbdOption.List, []);
        Assert.That((await client.ReadOptionRepliesAsync())[^1].Type, Is.EqualTo(OptionReplyType.Ack), "no ERR_TLS_REQD once TLS is up");
    }

    [Test]
    public async Task Starttls_with_data_is_ERR_INVALID()
    {
        await using TestServer server = Server(TlsMode.Require);
        await using NbdTestClient client = server.Connect();
        await client.StartAsync();
        await client.SendOptionAsync(NbdOption.StartTls, [1, 2, 3]);
        Assert.That((await client.ReadOptionReplyAsync()).Type, Is.EqualTo(OptionReplyType.ErrInvalid));
    }

    [Test]
    public async Task Starttls_when_tls_is_off_is_ERR_POLICY_and_no_option_gets_ERR_TLS_REQD()
    {
        await using TestServer server = Server(TlsMode.Off);
        await using NbdTestClient client = server.Connect();
        await client.StartAsync();
        await client.SendOptionAsync(NbdOption.StartTls, []);
        Assert.That((await client.ReadOptionReplyAsync()).Type, Is.EqualTo(OptionReplyType.ErrPolicy));
        await client.SendOptionAsync(NbdOption.Go, InfoRequest("vol0"));
        Assert.That((await client.ReadOptionRepliesAsync())[^1].Type, Is.EqualTo(OptionReplyType.Ack));
    }

    [Test]
    public async Task On_serves_a_plaintext_client_that_never_asks_for_tls()
    {
        await using TestServer server = Server(TlsMode.On);
        await using NbdTestClient client = server.Connect();
        (ulong size, _) = await client.ConnectAsync("vol0");
        Assert.That(size, Is.EqualTo(64UL << 20));
    }

    [Test]
    public async Task Structured_replies_negotiated_before_starttls_are_forgotten()
    {
        await using TestServer server = Server(TlsMode.On);
        await using NbdTestClient plain = server.Connect();
        await plain.StartAsync();
        await plain.SendOptionAsync(NbdOption.StructuredReply, []);
        Assert.That((await plain.ReadOptionReplyAsync()).Type, Is.EqualTo(OptionReplyType.Ack));
        await using NbdTestClient client = await StartTlsAsync(plain, null);
        await client.SendOptionAsync(NbdOption.Go, InfoRequest("vol0"));
        Assert.That((await client.ReadOptionRepliesAsync())[^1].Type, Is.EqualTo(OptionReplyType.Ack));
        await client.SendRequestAsync(NbdCommand.Read, 0, 512, cookie: 3);
        Assert.That((await client.ReadChunkAsync()).Simple, Is.True, "plaintext negotiation could have been forged, so it does not carry over");
    }

    [Test]
    public async Task Bytes_sent_after_starttls_without_waiting_for_the_ack_close_the_connection()
    {
        await using TestServer server = Server(TlsMode.Require);
        await using NbdTestClient client = server.Connect();
        await client.StartAsync();
        byte[] starttls = new byte[16];
        System.Buffers.Binary.BinaryPrimitives.WriteUInt64BigEndian(starttls, NbdMagic.Option);
        System.Buffers.Binary.BinaryPrimitives.WriteUInt32BigEndian(starttls.AsSpan(8), (uint)NbdOption.StartTls);
        // STARTTLS and a plaintext LIST in one write: the LIST must never be taken as TLS data.
        byte[] list = new byte[16];
        System.Buffers.Binary.BinaryPrimitives.WriteUInt64BigEndian(list, NbdMagic.Option);
        System.Buffers.Binary.BinaryPrimitives.WriteUInt32BigEndian(list.AsSpan(8), (uint)NbdOption.List);
        await client.WriteAsync([.. starttls, .. list]);
        Assert.That(await client.IsClosedAsync(), Is.True);
    }

    [Test]
    public async Task Plaintext_pipelined_after_starttls_in_a_later_write_is_never_served()
    {
        // The classic STARTTLS injection, with the injected bytes in their own segment so they may
        // reach the server after it checked its buffer: they must end up as (broken) TLS, never as NBD.
        await using TestServer server = Server(TlsMode.On);
        await using NbdTestClient client = server.Connect();
        await client.StartAsync();
        await client.SendOptionAsync(NbdOption.StartTls, []);
        await client.SendOptionAsync(NbdOption.Go, InfoRequest(""));
        await client.SendRequestAsync(NbdCommand.Write, 0, 512, cookie: 7, payload: Enumerable.Repeat((byte)0xAB, 512).ToArray());
        var received = new List<byte>();
        byte[] buffer = new byte[4096];
        int read;
        while ((read = await client.Stream.ReadAsync(buffer).AsTask().WaitAsync(TimeSpan.FromSeconds(10))) > 0)
        {
            received.AddRange(buffer.AsSpan(0, read).ToArray());
        }
        // At most STARTTLS's ACK (20 bytes) came back, then the connection closed; nothing was written.
        Assert.That(received, Has.Count.LessThanOrEqualTo(20));
        byte[] block = new byte[512];
        await server.Volume.ReadAsync(0, block, CancellationToken.None);
        Assert.That(block, Is.All.EqualTo((byte)0));
    }

    [Test]
    public async Task Verify_client_refuses_a_client_without_a_certificate_or_from_another_ca()
    {
        await using TestServer server = Server(TlsMode.Require, verifyClient: true);
        foreach (X509Certificate2? certificate in new[] { null, _strangerClient })
        {
            await using NbdTestClient plain = server.Connect();
            await plain.StartAsync();
            Assert.That(async () =>
            {
                await using NbdTestClient client = await StartTlsAsync(plain, certificate);
                await client.SendOptionAsync(NbdOption.List, []);
                await client.ReadOptionReplyAsync();
            }, Throws.InstanceOf<Exception>(), certificate is null ? "no certificate" : "another CA");
        }

        await using NbdTestClient trusted = server.Connect();
        await trusted.StartAsync();
        await using NbdTestClient ok = await StartTlsAsync(trusted, _client);
        await ok.SendOptionAsync(NbdOption.Go, InfoRequest("vol0"));
        Assert.That((await ok.ReadOptionRepliesAsync())[^1].Type, Is.EqualTo(OptionReplyType.Ack), "a client with a certificate from our CA is served");
    }

    [Test]
    public async Task A_client_that_never_starts_the_tls_handshake_is_dropped_at_the_handshake_timeout()
    {
        await using TestServer server = Server(TlsMode.Require, handshakeTimeout: TimeSpan.FromSeconds(1));
        await using NbdTestClient client = server.Connect();
        await client.StartAsync();
        await client.SendOptionAsync(NbdOption.StartTls, []);
        Assert.That((await client.ReadOptionReplyAsync()).Type, Is.EqualTo(OptionReplyType.Ack));
        Assert.That(await client.IsClosedAsync(TimeSpan.FromSeconds(5)), Is.True);
    }

    /// <summary>Sends STARTTLS, expects ACK, and runs the client side of the handshake (trusting our test CA).</summary>
    private static async Task<NbdTestClient> StartTlsAsync(NbdTestClient plain, X509Certificate2? certificate)
    {
        await plain.SendOptionAsync(NbdOption.StartTls, []);
        Assert.That((await plain.ReadOptionReplyAsync()).Type, Is.EqualTo(OptionReplyType.Ack));
        var ssl = new SslStream(plain.Stream, leaveInnerStreamOpen: true);
        var options = new SslClientAuthenticationOptions
        {
            TargetHost = "localhost",
            EnabledSslProtocols = SslProtocols.Tls12 | SslProtocols.Tls13,
            ClientCertificates = certificate is null ? null : [certificate],
            CertificateChainPolicy = new X509ChainPolicy { TrustMode = X509ChainTrustMode.CustomRootTrust, CustomTrustStore = { _ca }, RevocationMode = X509RevocationMode.NoCheck },
        };
        await ssl.AuthenticateAsClientAsync(options).WaitAsync(TimeSpan.FromSeconds(10));
        return new NbdTestClient(ssl);
    }
}
