using System.Globalization;
using System.Net.Security;
using System.Security.Authentication;
using System.Security.Cryptography.X509Certificates;

namespace NbdServer.Common.Tls;

/// <summary>
/// The outcome of one handshake's certificate check, filled in by the validation callback: SslStream
/// only reports "the callback said no", so the reason is kept here for the log line.
/// </summary>
public sealed class TlsPeerCheck
{
    /// <summary>Why the peer's certificate was refused; null when it was accepted (or never checked).</summary>
    public string? Failure { get; internal set; }

    /// <summary>The peer certificate's common name, when it presented one.</summary>
    public string? PeerName { get; internal set; }

    /// <summary>The peer certificate's SHA-256 fingerprint, when it presented one.</summary>
    public string? PeerFingerprint { get; internal set; }
}

/// <summary>TLS versions we speak: 1.2 for older GnuTLS/OpenSSL clients, 1.3 otherwise. Nothing older.</summary>
internal static class TlsVersions
{
    public const SslProtocols Allowed = SslProtocols.Tls12 | SslProtocols.Tls13;
}

/// <summary>
/// The cipher suites of the downstairs link, fastest first: AES-128-GCM, then AES-256-GCM, then
/// ChaCha20-Poly1305, all AEAD with forward secrecy; nothing weaker is offered.
/// </summary>
/// <remarks>
/// OpenSSL's default order puts AES-256-GCM first, and the server's order wins. AES-128 runs 10
/// rounds to AES-256's 14 for the same 128-bit GHASH, and on a bulk link the cipher is most of the
/// TLS cost (a quarter to a third of all CPU samples of a 1 MiB read or write over TLS, perf on
/// this 2-CPU AMD EPYC with VAES). Measured: `openssl speed` 5.0 vs 4.86 GB/s; one downstairs
/// driven by `nbd-downstairs bench` (interleaved, noisy shared host) used ~3 % less CPU per 1 MiB
/// with it. Small but free; its security margin is ample for keys that live for one connection.
/// </remarks>
internal static class TlsCipherSuites
{
    /// <summary>The policy, or null where the platform has no cipher-suite control (its defaults then apply).</summary>
    public static CipherSuitesPolicy? Link { get; } = OperatingSystem.IsLinux() || OperatingSystem.IsMacOS() || OperatingSystem.IsFreeBSD()
        ? new CipherSuitesPolicy(
        [
            TlsCipherSuite.TLS_AES_128_GCM_SHA256,
            TlsCipherSuite.TLS_AES_256_GCM_SHA384,
            TlsCipherSuite.TLS_CHACHA20_POLY1305_SHA256,
            // TLS 1.2 peers (an operator's own certificates may be RSA).
            TlsCipherSuite.TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
            TlsCipherSuite.TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
            TlsCipherSuite.TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
            TlsCipherSuite.TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
            TlsCipherSuite.TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
            TlsCipherSuite.TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
        ])
        : null;
}

/// <summary>
/// How a TLS server (a downstairs, or the NBD frontend) authenticates: its own certificate, and
/// optionally a required client certificate that chains to ca-cert.pem and, if an allowlist is
/// given, carries one of the allowed names.
/// </summary>
public sealed class TlsServerPolicy
{
    private readonly SslStreamCertificateContext _certificate;
    private readonly TimeProvider _time;

    public TlsServerPolicy(TlsCredentials credentials, bool requireClientCertificate, IReadOnlyCollection<string>? allowedClients = null, TimeProvider? time = null)
    {
        X509Certificate2 own = credentials.Certificate ?? throw new TlsSetupException($"TLS directory '{credentials.Directory}' has no server certificate");
        if (requireClientCertificate && credentials.TrustedCas.Count == 0)
        {
            throw new TlsSetupException($"TLS directory '{credentials.Directory}' has no {TlsFiles.CaCert} to verify client certificates with");
        }
        Credentials = credentials;
        RequireClientCertificate = requireClientCertificate;
        AllowedClients = allowedClients ?? [];
        _time = time ?? TimeProvider.System;
        // offline: the chain is built from what we have; no AIA fetch at start or per handshake.
        _certificate = SslStreamCertificateContext.Create(own, credentials.Intermediates, offline: true);
    }

    public TlsCredentials Credentials { get; }

    public bool RequireClientCertificate { get; }

    public IReadOnlyCollection<string> AllowedClients { get; }

    /// <summary>
    /// After the handshake, hold the TLS records of a write until the next flush (see
    /// <see cref="TlsTransportStream"/>). Only for a writer that flushes after each batch.
    /// </summary>
    public bool CoalesceWrites { get; init; }

    /// <summary>
    /// Prefer AES-128-GCM over OpenSSL's default AES-256-GCM (<see cref="TlsCipherSuites"/>); for the
    /// downstairs link, whose only clients are ours. Off leaves the platform's defaults.
    /// </summary>
    public bool PreferAes128 { get; init; }

    /// <summary>Options for one handshake; the verdict on the client's certificate lands in <paramref name="check"/>.</summary>
    public SslServerAuthenticationOptions CreateOptions(TlsPeerCheck check)
    {
        ArgumentNullException.ThrowIfNull(check);
        return new SslServerAuthenticationOptions
        {
            ServerCertificateContext = _certificate,
            ClientCertificateRequired = RequireClientCertificate,
            EnabledSslProtocols = TlsVersions.Allowed,
            CipherSuitesPolicy = PreferAes128 ? TlsCipherSuites.Link : null,
            CertificateRevocationCheckMode = X509RevocationMode.NoCheck,
            // The platform's own chain build: kept local (our CA, no downloads); the decision is ours below.
            CertificateChainPolicy = RequireClientCertificate
                ? TlsPeerVerifier.ChainPolicy(Credentials.TrustedCas, TlsPeerRole.Client, _time.GetUtcNow())
                : null,
            AllowRenegotiation = false,
            RemoteCertificateValidationCallback = (_, certificate, chain, _) => Verify(certificate, chain, check),
        };
    }

    /// <summary>
    /// Runs the server side of the handshake on <paramref name="inner"/> within <paramref name="timeout"/>.
    /// On failure the stream (and <paramref name="inner"/>) is disposed and a
    /// <see cref="TlsHandshakeException"/> says why; nothing of the peer's was read beyond the handshake.
    /// </summary>
    public Task<SslStream> AuthenticateAsync(Stream inner, TimeSpan timeout, CancellationToken cancellationToken) =>
        TlsHandshake.RunAsync(inner, timeout, _time, CoalesceWrites, cancellationToken,
            (ssl, check, ct) => ssl.AuthenticateAsServerAsync(CreateOptions(check), ct));

    private bool Verify(X509Certificate? presented, X509Chain? chain, TlsPeerCheck check)
    {
        if (presented is null)
        {
            if (RequireClientCertificate)
            {
                check.Failure = "the client presented no certificate";
                return false;
            }
            return true;
        }
        using X509Certificate2 certificate = TlsHandshake.Own(presented);
        check.PeerName = TlsPeerVerifier.Describe(certificate);
        check.PeerFingerprint = TlsPeerVerifier.Fingerprint(certificate);
        if (!RequireClientCertificate)
        {
            // A certificate nobody asked for is neither trusted nor held against the client.
            return true;
        }
        using TlsHandshake.Presented extra = TlsHandshake.Intermediates(chain, certificate);
        check.Failure = TlsPeerVerifier.CheckChain(certificate, Credentials.TrustedCas, TlsPeerRole.Client, _time.GetUtcNow(), extra.Certificates)
            ?? TlsPeerVerifier.CheckAllowed(certificate, AllowedClients);
        return check.Failure is null;
    }
}

/// <summary>
/// How a TLS client (the upstairs towards a downstairs) authenticates: the server's certificate must
/// chain to ca-cert.pem and either carry the expected name or, when a pin is set, have that SHA-256
/// fingerprint. Our own client certificate is presented when the server asks.
/// </summary>
public sealed class TlsClientPolicy
{
    private readonly SslStreamCertificateContext? _certificate;
    private readonly byte[]? _pin;
    private readonly TimeProvider _time;

    public TlsClientPolicy(TlsCredentials credentials, byte[]? pin = null, TimeProvider? time = null)
    {
        if (credentials.TrustedCas.Count == 0)
        {
            throw new TlsSetupException($"TLS directory '{credentials.Directory}' has no {TlsFiles.CaCert} to verify the server with");
        }
        if (pin is not null && pin.Length != 32)
        {
            throw new TlsSetupException("a certificate pin is a SHA-256 fingerprint: 32 bytes");
        }
        Credentials = credentials;
        _pin = pin;
        _time = time ?? TimeProvider.System;
        _certificate = credentials.Certificate is null ? null : SslStreamCertificateContext.Create(credentials.Certificate, credentials.Intermediates, offline: true);
    }

    public TlsCredentials Credentials { get; }

    /// <summary>
    /// After the handshake, hold the TLS records of a write until the next flush (see
    /// <see cref="TlsTransportStream"/>). Only for a writer that flushes after each batch.
    /// </summary>
    public bool CoalesceWrites { get; init; }

    /// <summary>Options for one handshake with a server expected to be <paramref name="expectedName"/>.</summary>
    public SslClientAuthenticationOptions CreateOptions(string expectedName, TlsPeerCheck check)
    {
        ArgumentNullException.ThrowIfNull(check);
        ArgumentException.ThrowIfNullOrEmpty(expectedName);
        return new SslClientAuthenticationOptions
        {
            // SNI; SslStream sends none for an IP literal, as RFC 6066 requires.
            TargetHost = expectedName.Trim('[', ']'),
            ClientCertificateContext = _certificate,
            EnabledSslProtocols = TlsVersions.Allowed,
            // Only offers: the server's order decides (a downstairs prefers AES-128 too).
            CipherSuitesPolicy = TlsCipherSuites.Link,
            CertificateRevocationCheckMode = X509RevocationMode.NoCheck,
            CertificateChainPolicy = TlsPeerVerifier.ChainPolicy(Credentials.TrustedCas, TlsPeerRole.Server, _time.GetUtcNow()),
            AllowRenegotiation = false,
            RemoteCertificateValidationCallback = (_, certificate, chain, _) => Verify(certificate, chain, expectedName, check),
        };
    }

    /// <summary>
    /// Runs the client side of the handshake within <paramref name="timeout"/>. On failure the stream
    /// (and <paramref name="inner"/>) is disposed and a <see cref="TlsHandshakeException"/> says why.
    /// </summary>
    public Task<SslStream> AuthenticateAsync(Stream inner, string expectedName, TimeSpan timeout, CancellationToken cancellationToken) =>
        TlsHandshake.RunAsync(inner, timeout, _time, CoalesceWrites, cancellationToken,
            (ssl, check, ct) => ssl.AuthenticateAsClientAsync(CreateOptions(expectedName, check), ct));

    private bool Verify(X509Certificate? presented, X509Chain? chain, string expectedName, TlsPeerCheck check)
    {
        if (presented is null)
        {
            check.Failure = "the server presented no certificate";
            return false;
        }
        using X509Certificate2 certificate = TlsHandshake.Own(presented);
        check.PeerName = TlsPeerVerifier.Describe(certificate);
        check.PeerFingerprint = TlsPeerVerifier.Fingerprint(certificate);
        using TlsHandshake.Presented extra = TlsHandshake.Intermediates(chain, certificate);
        check.Failure = TlsPeerVerifier.CheckChain(certificate, Credentials.TrustedCas, TlsPeerRole.Server, _time.GetUtcNow(), extra.Certificates)
            ?? (_pin is not null ? TlsPeerVerifier.CheckPin(certificate, _pin) : TlsPeerVerifier.CheckServerName(certificate, expectedName));
        return check.Failure is null;
    }
}

internal static class TlsHandshake
{
    /// <summary>
    /// Read-ahead and write-batch size under SslStream: 16 full TLS records, so a 1 MiB frame is 4
    /// sends instead of 64, at 512 KiB per connection (a volume has three links per process).
    /// </summary>
    public const int TransportBufferBytes = 256 << 10;

    /// <summary>A copy of the peer's certificate that we own (SslStream keeps and disposes its own).</summary>
    public static X509Certificate2 Own(X509Certificate presented) => X509CertificateLoader.LoadCertificate(presented.GetRawCertData());

    /// <summary>The certificates the platform saw beside the leaf (what the peer sent), as candidates for intermediates.</summary>
    public static Presented Intermediates(X509Chain? chain, X509Certificate2 leaf)
    {
        var extra = new X509Certificate2Collection();
        if (chain is not null)
        {
            foreach (X509ChainElement element in chain.ChainElements)
            {
                if (!element.Certificate.RawDataMemory.Span.SequenceEqual(leaf.RawDataMemory.Span))
                {
                    extra.Add(X509CertificateLoader.LoadCertificate(element.Certificate.RawDataMemory.Span));
                }
            }
        }
        return new Presented(extra);
    }

    /// <summary>
    /// One handshake, either side, under a deadline: over our read-ahead/coalescing transport, and on
    /// failure the stream (and <paramref name="inner"/>) disposed and the reason in one exception.
    /// </summary>
    public static async Task<SslStream> RunAsync(Stream inner, TimeSpan timeout, TimeProvider time, bool coalesceWrites, CancellationToken cancellationToken,
        Func<SslStream, TlsPeerCheck, CancellationToken, Task> authenticate)
    {
        var check = new TlsPeerCheck();
        var transport = new TlsTransportStream(inner, TransportBufferBytes);
        var ssl = new SslStream(transport, leaveInnerStreamOpen: false);
        using var deadline = new CancellationTokenSource(timeout, time);
        using var linked = CancellationTokenSource.CreateLinkedTokenSource(deadline.Token, cancellationToken);
        try
        {
            await authenticate(ssl, check, linked.Token).ConfigureAwait(false);
            transport.CoalesceWrites = coalesceWrites;
            return ssl;
        }
        catch (Exception e) when (e is AuthenticationException or IOException or OperationCanceledException or ObjectDisposedException)
        {
            await ssl.DisposeAsync().ConfigureAwait(false);
            cancellationToken.ThrowIfCancellationRequested();
            throw Failure(e, check, deadline.IsCancellationRequested, timeout);
        }
    }

    public static TlsHandshakeException Failure(Exception e, TlsPeerCheck check, bool timedOut, TimeSpan timeout)
    {
        string reason = check.Failure
            ?? (timedOut ? $"TLS handshake not completed within {timeout.TotalSeconds.ToString("0.###", CultureInfo.InvariantCulture)} s"
                : e is AuthenticationException ? $"TLS handshake failed: {Innermost(e).Message}"
                : $"connection closed during the TLS handshake ({Innermost(e).Message})");
        return new TlsHandshakeException(reason, e) { PeerName = check.PeerName };
    }

    private static Exception Innermost(Exception e)
    {
        while (e.InnerException is not null)
        {
            e = e.InnerException;
        }
        return e;
    }

    internal readonly struct Presented(X509Certificate2Collection certificates) : IDisposable
    {
        public X509Certificate2Collection Certificates { get; } = certificates;

        public void Dispose()
        {
            foreach (X509Certificate2 c in Certificates)
            {
                c.Dispose();
            }
        }
    }
}
