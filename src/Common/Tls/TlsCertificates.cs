using System.Net;
using System.Security.Cryptography;
using System.Security.Cryptography.X509Certificates;

namespace NbdServer.Common.Tls;

/// <summary>When a certificate is valid: from <see cref="NotBefore"/> to <see cref="NotAfter"/>.</summary>
public readonly record struct CertificateValidity(DateTimeOffset NotBefore, DateTimeOffset NotAfter)
{
    /// <summary>
    /// Backdating by a few minutes lets a peer whose clock is slightly behind accept a certificate
    /// made a moment ago on another host.
    /// </summary>
    public static readonly TimeSpan ClockSkew = TimeSpan.FromMinutes(5);

    /// <summary>A validity starting now (less <see cref="ClockSkew"/>) and lasting <paramref name="lifetime"/>.</summary>
    public static CertificateValidity Starting(DateTimeOffset now, TimeSpan lifetime) => new(now - ClockSkew, now + lifetime);
}

/// <summary>
/// Makes a small private PKI with .NET's own <see cref="CertificateRequest"/>: a CA, a server
/// certificate per downstairs (or NBD server) host, a client certificate per upstairs. ECDSA P-256
/// throughout: fast handshakes, small certificates, supported by OpenSSL and GnuTLS.
/// </summary>
/// <remarks>
/// The extensions follow what GnuTLS-based peers (qemu's tls-creds-x509 checks them at load) expect:
/// the CA is a critical basicConstraints CA with keyCertSign; a leaf is a critical non-CA with
/// digitalSignature and keyEncipherment (qemu refuses a critical key usage without the latter) and
/// the serverAuth or clientAuth purpose.
/// </remarks>
public static class TlsCertificates
{
    /// <summary>Ten years: replacing a CA means touching every host.</summary>
    public static readonly TimeSpan DefaultCaLifetime = TimeSpan.FromDays(3652);

    /// <summary>One year: long enough not to be a chore, short enough that a leaked key stops working.</summary>
    public static readonly TimeSpan DefaultLeafLifetime = TimeSpan.FromDays(365);

    private const string ServerAuthOid = "1.3.6.1.5.5.7.3.1";
    private const string ClientAuthOid = "1.3.6.1.5.5.7.3.2";
    private const int SerialLength = 16;

    /// <summary>A self-signed CA certificate (with its private key) named <paramref name="name"/>.</summary>
    public static X509Certificate2 CreateCa(string name, CertificateValidity validity)
    {
        using var key = ECDsa.Create(ECCurve.NamedCurves.nistP256);
        var request = new CertificateRequest(Subject(name), key, HashAlgorithmName.SHA256);
        request.CertificateExtensions.Add(new X509BasicConstraintsExtension(certificateAuthority: true, hasPathLengthConstraint: true, pathLengthConstraint: 0, critical: true));
        request.CertificateExtensions.Add(new X509KeyUsageExtension(X509KeyUsageFlags.KeyCertSign | X509KeyUsageFlags.CrlSign | X509KeyUsageFlags.DigitalSignature, critical: true));
        request.CertificateExtensions.Add(new X509SubjectKeyIdentifierExtension(request.PublicKey, critical: false));
        return request.CreateSelfSigned(validity.NotBefore, validity.NotAfter);
    }

    /// <summary>
    /// A server certificate for <paramref name="name"/>, valid for the given DNS names and IP addresses
    /// (at least one), signed by <paramref name="ca"/>. Validity is cut to the CA's own.
    /// </summary>
    public static X509Certificate2 CreateServer(X509Certificate2 ca, string name, IEnumerable<string> dnsNames, IEnumerable<IPAddress> ipAddresses, CertificateValidity validity)
    {
        var san = new SubjectAlternativeNameBuilder();
        int count = 0;
        foreach (string dns in dnsNames)
        {
            san.AddDnsName(dns);
            count++;
        }
        foreach (IPAddress ip in ipAddresses)
        {
            san.AddIpAddress(ip);
            count++;
        }
        if (count == 0)
        {
            throw new ArgumentException("a server certificate needs at least one DNS name or IP address", nameof(dnsNames));
        }
        return CreateLeaf(ca, name, ServerAuthOid, san.Build(critical: false), validity);
    }

    /// <summary>A client certificate whose common name is <paramref name="identity"/> (what a downstairs' allowlist names), signed by <paramref name="ca"/>.</summary>
    public static X509Certificate2 CreateClient(X509Certificate2 ca, string identity, CertificateValidity validity) =>
        CreateLeaf(ca, identity, ClientAuthOid, san: null, validity);

    /// <summary>Loads a CA certificate with its private key (ca-cert.pem and ca-key.pem) to sign with.</summary>
    public static X509Certificate2 LoadCa(string directory)
    {
        string cert = Path.Combine(directory, TlsFiles.CaCert);
        string key = Path.Combine(directory, TlsFiles.CaKey);
        foreach (string path in new[] { cert, key })
        {
            if (!File.Exists(path))
            {
                throw new TlsSetupException($"CA directory '{directory}' has no {Path.GetFileName(path)}");
            }
        }
        try
        {
            return X509Certificate2.CreateFromPemFile(cert, key);
        }
        catch (Exception e) when (e is CryptographicException or ArgumentException)
        {
            throw new TlsSetupException($"{cert} with {key}: cannot load ({e.Message})", e);
        }
    }

    /// <summary>Writes a CA directory: ca-cert.pem (0644) and ca-key.pem (0600).</summary>
    public static void WriteCa(string directory, X509Certificate2 ca, bool overwrite)
    {
        CreateDirectory(directory);
        WritePem(Path.Combine(directory, TlsFiles.CaCert), ca.ExportCertificatePem(), secret: false, overwrite);
        WritePem(Path.Combine(directory, TlsFiles.CaKey), PrivateKeyPem(ca), secret: true, overwrite);
    }

    /// <summary>
    /// Writes a server's files into <paramref name="directory"/>: ca-cert.pem, server-cert.pem and
    /// server-key.pem (0600). A directory may also hold a client's files (an nbd-server host is both).
    /// </summary>
    public static void WriteServer(string directory, X509Certificate2 ca, X509Certificate2 server, bool overwrite) =>
        WriteLeaf(directory, ca, server, TlsFiles.ServerCert, TlsFiles.ServerKey, overwrite);

    /// <summary>Writes a client's files into <paramref name="directory"/>: ca-cert.pem, client-cert.pem and client-key.pem (0600).</summary>
    public static void WriteClient(string directory, X509Certificate2 ca, X509Certificate2 client, bool overwrite) =>
        WriteLeaf(directory, ca, client, TlsFiles.ClientCert, TlsFiles.ClientKey, overwrite);

    /// <summary>
    /// Writes <paramref name="text"/> to <paramref name="path"/> through a temporary file that is
    /// created with its final mode (0600 for a secret, 0644 otherwise) and renamed into place: a key
    /// is never readable by others, not even for a moment. Refuses to replace a file unless
    /// <paramref name="overwrite"/>.
    /// </summary>
    public static void WritePem(string path, string text, bool secret, bool overwrite)
    {
        if (!overwrite && File.Exists(path))
        {
            throw new TlsSetupException($"{path} already exists (use --force to replace it)");
        }
        string temporary = path + ".tmp";
        File.Delete(temporary);
        var options = new FileStreamOptions { Mode = FileMode.CreateNew, Access = FileAccess.Write, Share = FileShare.None };
        if (!OperatingSystem.IsWindows())
        {
            options.UnixCreateMode = secret
                ? UnixFileMode.UserRead | UnixFileMode.UserWrite
                : UnixFileMode.UserRead | UnixFileMode.UserWrite | UnixFileMode.GroupRead | UnixFileMode.OtherRead;
        }
        using (var stream = new FileStream(temporary, options))
        using (var writer = new StreamWriter(stream))
        {
            writer.Write(text);
            writer.Write('\n');
            writer.Flush();
            stream.Flush(flushToDisk: true);
        }
        File.Move(temporary, path, overwrite);
    }

    private static X509Certificate2 CreateLeaf(X509Certificate2 ca, string name, string purpose, X509Extension? san, CertificateValidity validity)
    {
        if (!ca.HasPrivateKey)
        {
            throw new ArgumentException("the CA certificate has no private key to sign with", nameof(ca));
        }
        DateTimeOffset notAfter = validity.NotAfter < ca.NotAfter ? validity.NotAfter : new DateTimeOffset(ca.NotAfter.ToUniversalTime(), TimeSpan.Zero);
        DateTimeOffset notBefore = validity.NotBefore > ca.NotBefore ? validity.NotBefore : new DateTimeOffset(ca.NotBefore.ToUniversalTime(), TimeSpan.Zero);
        if (notBefore >= notAfter)
        {
            throw new ArgumentException($"the certificate would not be valid at any time inside the CA's validity ({ca.NotBefore:u} to {ca.NotAfter:u})", nameof(validity));
        }
        using var key = ECDsa.Create(ECCurve.NamedCurves.nistP256);
        var request = new CertificateRequest(Subject(name), key, HashAlgorithmName.SHA256);
        request.CertificateExtensions.Add(new X509BasicConstraintsExtension(certificateAuthority: false, hasPathLengthConstraint: false, pathLengthConstraint: 0, critical: true));
        request.CertificateExtensions.Add(new X509KeyUsageExtension(X509KeyUsageFlags.DigitalSignature | X509KeyUsageFlags.KeyEncipherment, critical: true));
        request.CertificateExtensions.Add(new X509EnhancedKeyUsageExtension([new System.Security.Cryptography.Oid(purpose)], critical: false));
        request.CertificateExtensions.Add(new X509SubjectKeyIdentifierExtension(request.PublicKey, critical: false));
        request.CertificateExtensions.Add(X509AuthorityKeyIdentifierExtension.CreateFromCertificate(ca, includeKeyIdentifier: true, includeIssuerAndSerial: false));
        if (san is not null)
        {
            request.CertificateExtensions.Add(san);
        }
        byte[] serial = RandomNumberGenerator.GetBytes(SerialLength);
        serial[0] &= 0x7F; // a positive INTEGER, as RFC 5280 requires
        serial[0] |= 0x01; // and never a leading zero byte that DER would have to drop
        using X509Certificate2 signed = request.Create(ca, notBefore, notAfter, serial);
        return signed.CopyWithPrivateKey(key);
    }

    private static X500DistinguishedName Subject(string name)
    {
        ArgumentException.ThrowIfNullOrWhiteSpace(name);
        var builder = new X500DistinguishedNameBuilder();
        builder.AddCommonName(name);
        return builder.Build();
    }

    private static string PrivateKeyPem(X509Certificate2 certificate)
    {
        using ECDsa key = certificate.GetECDsaPrivateKey() ?? throw new ArgumentException("the certificate has no ECDSA private key", nameof(certificate));
        return key.ExportPkcs8PrivateKeyPem();
    }

    private static void WriteLeaf(string directory, X509Certificate2 ca, X509Certificate2 leaf, string certName, string keyName, bool overwrite)
    {
        CreateDirectory(directory);
        string caPath = Path.Combine(directory, TlsFiles.CaCert);
        string caPem = ca.ExportCertificatePem();
        // The same directory may collect a server and a client certificate from one CA; a ca-cert.pem
        // from another CA would make one of them fail, so it is refused rather than replaced silently.
        if (File.Exists(caPath) && !overwrite && File.ReadAllText(caPath).Trim() != caPem.Trim())
        {
            throw new TlsSetupException($"{caPath} already holds a different CA (use --force to replace it)");
        }
        if (!File.Exists(caPath) || overwrite)
        {
            WritePem(caPath, caPem, secret: false, overwrite: true);
        }
        WritePem(Path.Combine(directory, certName), leaf.ExportCertificatePem(), secret: false, overwrite);
        WritePem(Path.Combine(directory, keyName), PrivateKeyPem(leaf), secret: true, overwrite);
    }

    private static void CreateDirectory(string directory)
    {
        if (OperatingSystem.IsWindows())
        {
            Directory.CreateDirectory(directory);
        }
        else
        {
            // 0700: the directory holds a private key; copied with its mode (tar -p), it stays private.
            Directory.CreateDirectory(directory, UnixFileMode.UserRead | UnixFileMode.UserWrite | UnixFileMode.UserExecute);
        }
    }
}
