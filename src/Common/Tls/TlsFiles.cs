namespace NbdServer.Common.Tls;

/// <summary>
/// The file names of a TLS directory. They are GnuTLS's (qemu <c>tls-creds-x509 dir=</c>, nbdkit
/// <c>--tls-certificates</c>, libnbd <c>nbd_set_tls_certificates</c>), so one directory written by
/// <c>nbd-certs</c> serves our daemons and those tools alike.
/// </summary>
public static class TlsFiles
{
    /// <summary>The certificate(s) of the CA a peer must chain to; nothing else is trusted.</summary>
    public const string CaCert = "ca-cert.pem";

    /// <summary>The CA's private key; only on the host that issues certificates, never copied to a daemon.</summary>
    public const string CaKey = "ca-key.pem";

    public const string ServerCert = "server-cert.pem";
    public const string ServerKey = "server-key.pem";
    public const string ClientCert = "client-cert.pem";
    public const string ClientKey = "client-key.pem";
}

/// <summary>A TLS directory or certificate that cannot be used; the message names the file and the reason.</summary>
public sealed class TlsSetupException(string message, Exception? inner = null) : Exception(message, inner);

/// <summary>
/// A TLS handshake that failed or was refused; <see cref="Exception.Message"/> is one line saying why
/// ("client certificate is not issued by the CA in ca-cert.pem", "no client certificate", …).
/// </summary>
public sealed class TlsHandshakeException(string reason, Exception? inner = null) : IOException(reason, inner)
{
    /// <summary>The peer's certificate name when it presented one (for the log line), else null.</summary>
    public string? PeerName { get; init; }
}
