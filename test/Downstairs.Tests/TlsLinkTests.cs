using System.Buffers;
using System.Net;
using System.Net.Security;
using System.Net.Sockets;
using System.Security.Authentication;
using System.Security.Cryptography;
using System.Security.Cryptography.X509Certificates;
using NbdServer.Common.Tls;
using NbdServer.Protocol;
using NbdServer.Downstairs.Server;
using NbdServer.Downstairs.Storage;

namespace NbdServer.Downstairs.Tests;

/// <summary>
/// The downstairs behind mutual TLS, attacked over real loopback TCP: every stranger is turned away
/// before its Hello is read, and the honest upstairs, connected throughout, keeps being served.
/// </summary>
[CancelAfter(60_000)]
public sealed class TlsLinkTests
{
    private static readonly DateTimeOffset Now = DateTimeOffset.UtcNow;
    private static readonly CertificateValidity Year = CertificateValidity.Starting(Now, TimeSpan.FromDays(365));

    private X509Certificate2 _ca = null!;
    private X509Certificate2 _otherCa = null!;
    private X509Certificate2 _serverCertificate = null!;
    private X509Certificate2 _upstairsCertificate = null!;
    private TempDir _dir = null!;
    private ListLogger _log = null!;
    private RegionHost _host = null!;
    private DownstairsServer _server = null!;
    private IPEndPoint _endpoint = null!;
    private DownstairsClient _honest = null!;

    [OneTimeSetUp]
    public void MakePki()
    {
        // Started in the past so that it can issue an already expired certificate.
        _ca = TlsCertificates.CreateCa("volume CA", new CertificateValidity(Now.AddDays(-60), Now.AddDays(3650)));
        _otherCa = TlsCertificates.CreateCa("volume CA", new CertificateValidity(Now.AddDays(-60), Now.AddDays(3650)));
        _serverCertificate = TlsCertificates.CreateServer(_ca, "ds0", ["ds0.test"], [IPAddress.Loopback], Year);
        _upstairsCertificate = TlsCertificates.CreateClient(_ca, "upstairs", Year);
    }

    [OneTimeTearDown]
    public void DisposePki()
    {
        _ca.Dispose();
        _otherCa.Dispose();
        _serverCertificate.Dispose();
        _upstairsCertificate.Dispose();
    }

    [SetUp]
    public async Task SetUp()
    {
        _dir = new TempDir();
        _log = new ListLogger();
        Region region = Region.Create(_dir.Sub("r"), 8 << 20, 4096, 512, preallocate: false);
        var options = new DownstairsOptions
        {
            DataDir = _dir.Sub("r"),
            Listen = new IPEndPoint(IPAddress.Loopback, 0),
            TlsHandshakeTimeout = TimeSpan.FromSeconds(3),
            LogSummaryInterval = TimeSpan.FromSeconds(30),
        };
        _host = new RegionHost(region, options, _log);
        var policy = new TlsServerPolicy(TlsCredentials.FromCertificates([_ca], _serverCertificate), requireClientCertificate: true, ["upstairs"]) { CoalesceWrites = true };
        _server = new DownstairsServer(_host, policy);
        _endpoint = _server.Start();

        // The honest upstairs: connected, has written and flushed, stays connected through each attack.
        _honest = await DownstairsClient.ConnectAsync(_endpoint, Hello(generation: 5), UpstairsOptions());
        Assert.That((await _honest.WriteAsync(1, 3, TestData.Block(4096, 3, 1))).IsOk, Is.True);
        Assert.That((await _honest.FlushAsync(2, 1, 5)).IsOk, Is.True);
    }

    [TearDown]
    public async Task TearDown()
    {
        await _honest.DisposeAsync();
        await _server.DisposeAsync();
        _host.Dispose();
        _dir.Dispose();
    }

    private DownstairsClientOptions UpstairsOptions(X509Certificate2? clientCertificate = null, string? name = null, byte[]? pin = null) => new()
    {
        Tls = new TlsClientPolicy(TlsCredentials.FromCertificates([_ca], clientCertificate ?? _upstairsCertificate), pin) { CoalesceWrites = true },
        TlsServerName = name,
    };

    private static HelloRequest Hello(ulong generation, bool readOnly = false) =>
        new(Wire.ProtocolVersion, readOnly, Guid.Empty, Guid.NewGuid(), Guid.NewGuid(), generation);

    private static byte[] Bytes(OutgoingFrame f)
    {
        byte[] all = [.. f.Prefix.AsSpan(0, f.PrefixLength), .. f.Payload1.Span, .. f.Payload2.Span];
        f.ReturnPrefix();
        return all;
    }

    /// <summary>Every file of the region, hashed: "nothing on disk changed" is this being equal.</summary>
    private string DiskState()
    {
        string root = _dir.Sub("r");
        using var sha = IncrementalHash.CreateHash(HashAlgorithmName.SHA256);
        foreach (string file in Directory.GetFiles(root, "*", SearchOption.AllDirectories).Where(f => !f.EndsWith(".lock", StringComparison.Ordinal)).Order(StringComparer.Ordinal))
        {
            sha.AppendData(System.Text.Encoding.UTF8.GetBytes(Path.GetRelativePath(root, file)));
            using var stream = new FileStream(file, FileMode.Open, FileAccess.Read, FileShare.ReadWrite);
            byte[] buffer = new byte[1 << 16];
            int n;
            while ((n = stream.Read(buffer)) > 0)
            {
                sha.AppendData(buffer, 0, n);
            }
        }
        return Convert.ToHexString(sha.GetHashAndReset());
    }

    /// <summary>
    /// A stranger connects with <paramref name="certificate"/> (or none), trusts whatever server it
    /// finds, and sends a read-write Hello far above the current generation (which, if read, would
    /// fence the honest upstairs). Returns every byte the downstairs sent back over TLS.
    /// </summary>
    private async Task<byte[]> StrangerAsync(X509Certificate2? certificate)
    {
        using var socket = new Socket(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp);
        await socket.ConnectAsync(_endpoint);
        await using var ssl = new SslStream(new NetworkStream(socket, ownsSocket: false));
        var received = new MemoryStream();
        try
        {
            await ssl.AuthenticateAsClientAsync(new SslClientAuthenticationOptions
            {
                TargetHost = "ds0.test",
                ClientCertificates = certificate is null ? null : [certificate],
                RemoteCertificateValidationCallback = (_, _, _, _) => true,
            });
            // TLS 1.3: the client's side may finish before the server has judged its certificate.
            await ssl.WriteAsync(Bytes(Hello(generation: 1000).Encode()));
            byte[] buffer = new byte[4096];
            using var deadline = new CancellationTokenSource(TimeSpan.FromSeconds(10));
            int n;
            while ((n = await ssl.ReadAsync(buffer, deadline.Token)) > 0)
            {
                received.Write(buffer, 0, n);
            }
        }
        catch (Exception e) when (e is AuthenticationException or IOException)
        {
            // Refused: the connection was torn down.
        }
        return received.ToArray();
    }

    private async Task AssertRefusedBeforeHelloAsync(X509Certificate2? certificate, string reason)
    {
        string before = DiskState();
        ulong generation = _host.Region.HighestGeneration;
        long refusals = _server.TlsRefusals;

        byte[] reply = await StrangerAsync(certificate);

        Assert.That(reply, Is.Empty, "no Hello reply, no byte of the region");
        while (_server.TlsRefusals == refusals)
        {
            await Task.Delay(10);
        }
        // The refusal is logged by the server's handshake task, which may finish after the client saw the close.
        Assert.That(() => _log.Lines.Any(l => l.Contains("refused before Hello", StringComparison.Ordinal) && l.Contains(reason, StringComparison.Ordinal)),
            Is.True.After(2000).MilliSeconds.PollEvery(20).MilliSeconds, $"a line saying the peer was refused before Hello because: {reason}");
        Assert.That(_host.Region.HighestGeneration, Is.EqualTo(generation));
        Assert.That(DiskState(), Is.EqualTo(before), "nothing on disk changed");
        await AssertHonestUpstairsStillServedAsync();
    }

    private async Task AssertHonestUpstairsStillServedAsync()
    {
        byte[] back = new byte[4096];
        Assert.That((await _honest.ReadAsync(10, 3, back)).IsOk, Is.True, "the honest upstairs is still served");
        Assert.That(back, Is.EqualTo(TestData.Block(4096, 3, 1)));
        Assert.That((await _honest.WriteAsync(11, 4, TestData.Block(4096, 4, 2))).IsOk, Is.True);
    }

    [Test]
    public async Task The_upstairs_with_its_certificate_is_served_over_tls()
    {
        byte[] back = new byte[4096];
        Assert.That((await _honest.ReadAsync(3, 3, back)).IsOk, Is.True);
        Assert.That(back, Is.EqualTo(TestData.Block(4096, 3, 1)));
        Assert.That(_host.Region.HighestGeneration, Is.EqualTo(5UL));
    }

    [Test]
    public async Task A_client_without_a_certificate_is_refused_before_hello() =>
        await AssertRefusedBeforeHelloAsync(null, "no certificate");

    [Test]
    public async Task A_client_certificate_from_another_ca_is_refused_before_hello()
    {
        using X509Certificate2 forged = TlsCertificates.CreateClient(_otherCa, "upstairs", Year);
        await AssertRefusedBeforeHelloAsync(forged, "not issued by the CA");
    }

    [Test]
    public async Task An_expired_client_certificate_is_refused_before_hello()
    {
        using X509Certificate2 expired = TlsCertificates.CreateClient(_ca, "upstairs", new CertificateValidity(Now.AddDays(-30), Now.AddDays(-1)));
        await AssertRefusedBeforeHelloAsync(expired, "expired");
    }

    [Test]
    public async Task A_client_certificate_not_on_the_allowlist_is_refused_before_hello()
    {
        using X509Certificate2 other = TlsCertificates.CreateClient(_ca, "other-volume", Year);
        await AssertRefusedBeforeHelloAsync(other, "not in the allowed client list");
    }

    [Test]
    public async Task A_plaintext_read_only_hello_reads_nothing_from_a_tls_downstairs()
    {
        string before = DiskState();
        using var socket = new Socket(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp);
        await socket.ConnectAsync(_endpoint);
        await socket.SendAsync(Bytes(Hello(generation: 0, readOnly: true).Encode()));
        var received = new MemoryStream();
        byte[] buffer = new byte[4096];
        using var deadline = new CancellationTokenSource(TimeSpan.FromSeconds(10));
        try
        {
            int n;
            while ((n = await socket.ReceiveAsync(buffer, SocketFlags.None, deadline.Token)) > 0)
            {
                received.Write(buffer, 0, n);
            }
        }
        catch (SocketException)
        {
            // reset: refused
        }
        var bytes = new ReadOnlySequence<byte>(received.ToArray());
        bool helloReply = FrameReader.TryRead(ref bytes, Wire.DefaultMaxFrameBytes, out FrameHeader header, out _) && header.Type == MessageType.HelloReply;
        Assert.That(helloReply, Is.False, "no Hello reply");
        Assert.That(received.ToArray().AsSpan().IndexOf(_host.Region.Uuid.ToByteArray()), Is.EqualTo(-1), "not even the region id");
        Assert.That(DiskState(), Is.EqualTo(before));
        await AssertHonestUpstairsStillServedAsync();
    }

    [Test]
    public async Task The_upstairs_refuses_a_downstairs_with_another_name()
    {
        ulong generation = _host.Region.HighestGeneration;
        var e = Assert.ThrowsAsync<DownstairsConnectionException>(() => DownstairsClient.ConnectAsync(_endpoint, Hello(generation + 1), UpstairsOptions(name: "ds9.test")));
        Assert.That(e!.Message, Does.Contain("is not for 'ds9.test'"));
        Assert.That(_host.Region.HighestGeneration, Is.EqualTo(generation), "no Hello was sent");
        await AssertHonestUpstairsStillServedAsync();
    }

    [Test]
    public async Task The_upstairs_refuses_a_downstairs_with_the_wrong_pin()
    {
        ulong generation = _host.Region.HighestGeneration;
        Assert.That(TlsPeerVerifier.TryParsePin(TlsPeerVerifier.Fingerprint(_upstairsCertificate), out byte[] wrong), Is.True);
        var e = Assert.ThrowsAsync<DownstairsConnectionException>(() => DownstairsClient.ConnectAsync(_endpoint, Hello(generation + 1), UpstairsOptions(pin: wrong)));
        Assert.That(e!.Message, Does.Contain("not the pinned one"));
        Assert.That(_host.Region.HighestGeneration, Is.EqualTo(generation), "no Hello was sent");
    }

    [Test]
    public async Task The_upstairs_refuses_a_downstairs_whose_certificate_is_from_another_ca()
    {
        using X509Certificate2 impostor = TlsCertificates.CreateServer(_otherCa, "ds0", ["ds0.test"], [IPAddress.Loopback], Year);
        using var listener = new Socket(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp);
        listener.Bind(new IPEndPoint(IPAddress.Loopback, 0));
        listener.Listen();
        Task serve = Task.Run(async () =>
        {
            using Socket s = await listener.AcceptAsync();
            await using var ssl = new SslStream(new NetworkStream(s));
            try
            {
                await ssl.AuthenticateAsServerAsync(new SslServerAuthenticationOptions { ServerCertificate = impostor });
            }
            catch (Exception ex) when (ex is AuthenticationException or IOException)
            {
                // the upstairs hangs up
            }
        });
        var e = Assert.ThrowsAsync<DownstairsConnectionException>(() => DownstairsClient.ConnectAsync((IPEndPoint)listener.LocalEndPoint!, Hello(1), UpstairsOptions()));
        Assert.That(e!.Message, Does.Contain("not issued by the CA"));
        await serve;
    }

    [Test]
    public async Task A_pin_replaces_the_name_check()
    {
        Assert.That(TlsPeerVerifier.TryParsePin(TlsPeerVerifier.Fingerprint(_serverCertificate), out byte[] pin), Is.True);
        await using DownstairsClient reader = await DownstairsClient.ConnectAsync(_endpoint, Hello(0, readOnly: true), UpstairsOptions(name: "any-name", pin: pin));
        Assert.That(reader.Region.RegionId, Is.EqualTo(_host.Region.Uuid));
    }

    [Test]
    public async Task Many_4k_writes_and_a_large_read_cross_the_tls_link_intact()
    {
        // Exercises FrameSender's coalescing: many small frames per batch, and payloads above the coalesce size.
        byte[] big = new byte[FrameSender.CoalesceBytes * 2 + 4096];
        Random.Shared.NextBytes(big);
        var writes = Enumerable.Range(0, 64).Select(i => _honest.WriteAsync((ulong)(100 + i), 200 + i, TestData.Block(4096, 200 + i, 7))).ToList();
        writes.Add(_honest.WriteAsync(300, 1000, big));
        Assert.That((await Task.WhenAll(writes)).Select(r => r.IsOk), Has.All.True);
        byte[] back = new byte[big.Length];
        Assert.That((await _honest.ReadAsync(301, 1000, back)).IsOk, Is.True);
        Assert.That(back, Is.EqualTo(big));
        byte[] small = new byte[64 * 4096];
        Assert.That((await _honest.ReadAsync(302, 200, small)).IsOk, Is.True);
        Assert.That(small.AsSpan(63 * 4096).ToArray(), Is.EqualTo(TestData.Block(4096, 263, 7)));
    }

    [Test]
    public async Task Silent_strangers_in_the_handshake_cannot_keep_the_upstairs_out()
    {
        // Strangers take every handshake slot and never say a word.
        var silent = new List<Socket>();
        try
        {
            for (int i = 0; i < _host.Options.MaxConnections; i++)
            {
                var s = new Socket(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp);
                await s.ConnectAsync(_endpoint);
                silent.Add(s);
            }
            await Task.Delay(300); // let the accept loop take them all

            // The honest link still gets in at once: it pushes out the oldest stranger, not the other way round.
            await using (DownstairsClient reader = await DownstairsClient.ConnectAsync(_endpoint, Hello(0, readOnly: true), UpstairsOptions()))
            {
                Assert.That(reader.Region.RegionId, Is.EqualTo(_host.Region.Uuid));
            }
            Assert.That(_log.Lines, Has.Some.Contains("TLS handshakes in progress; closing the oldest"));

            // Past the handshake deadline (3 s here) the remaining strangers are gone too.
            await Task.Delay(_host.Options.TlsHandshakeTimeout + TimeSpan.FromSeconds(1));
            Assert.That(_log.Lines, Has.Some.Contains("TLS handshake not completed within 3 s"));
            await AssertHonestUpstairsStillServedAsync();
        }
        finally
        {
            foreach (Socket s in silent)
            {
                s.Dispose();
            }
        }
    }

    [Test]
    [CancelAfter(60_000)]
    public async Task A_stranger_flooding_handshakes_from_another_address_never_evicts_the_upstairs()
    {
        // A stranger on 127.0.0.2 opens silent TLS connections as fast as it can; each new one would
        // push out the oldest pending handshake, which at this rate is often the upstairs' own.
        using var flooding = new CancellationTokenSource(TimeSpan.FromSeconds(20));
        var opened = new System.Collections.Concurrent.ConcurrentQueue<Socket>();
        Task flood = Task.WhenAll(Enumerable.Range(0, 4).Select(_ => Task.Run(async () =>
        {
            for (int i = 0; i < 20_000 && !flooding.IsCancellationRequested; i++)
            {
                var s = new Socket(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp);
                s.Bind(new IPEndPoint(IPAddress.Parse("127.0.0.2"), 0));
                try
                {
                    await s.ConnectAsync(_endpoint, flooding.Token);
                }
                catch (Exception e) when (e is SocketException or OperationCanceledException)
                {
                    s.Dispose();
                    continue;
                }
                opened.Enqueue(s);
                while (opened.Count > 2000 && opened.TryDequeue(out Socket? old))
                {
                    old.Dispose();
                }
            }
        })));
        try
        {
            await Task.Delay(300);
            for (int i = 0; i < 20; i++)
            {
                await using DownstairsClient reader = await DownstairsClient.ConnectAsync(_endpoint, Hello(0, readOnly: true), UpstairsOptions());
                Assert.That(reader.Region.RegionId, Is.EqualTo(_host.Region.Uuid), $"attempt {i}");
            }
            Assert.That(_log.Lines, Has.Some.Contains("closing the oldest from 127.0.0.2"), "the flood did reach the cap");
        }
        finally
        {
            await flooding.CancelAsync();
            await flood;
            while (opened.TryDequeue(out Socket? s))
            {
                s.Dispose();
            }
        }
    }

    [Test]
    public async Task A_storm_of_strangers_with_ever_new_names_is_one_log_line()
    {
        long refusals = _server.TlsRefusals;
        for (int i = 0; i < 20; i++)
        {
            using X509Certificate2 forged = TlsCertificates.CreateClient(_otherCa, $"scanner-{i}", Year);
            Assert.That(await StrangerAsync(forged), Is.Empty);
        }
        while (_server.TlsRefusals < refusals + 20)
        {
            await Task.Delay(10);
        }
        Assert.That(_log.Lines.Count(l => l.Contains("refused before Hello", StringComparison.Ordinal)), Is.EqualTo(1), "the rest are counted for the summary line");
        Assert.That(_host.Throttle.TotalReported, Is.GreaterThanOrEqualTo(20));
        await AssertHonestUpstairsStillServedAsync();
    }
}
