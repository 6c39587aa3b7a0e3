using System.Security.Cryptography;
using System.Security.Cryptography.X509Certificates;

namespace NbdServer.Common.Tls;

/// <summary>
/// What one end of a link loads from its TLS directory: the CA(s) it trusts and, usually, its own
/// certificate with the private key (plus any intermediates that followed the leaf in the PEM file).
/// </summary>
public sealed class TlsCredentials : IDisposable
{
    private readonly bool _owned;

    private TlsCredentials(string directory, X509Certificate2Collection trustedCas, X509Certificate2? certificate, X509Certificate2Collection intermediates, bool owned = true)
    {
        _owned = owned;
        Directory = directory;
        TrustedCas = trustedCas;
        Certificate = certificate;
        Intermediates = intermediates;
    }

    public string Directory { get; }

    /// <summary>The contents of ca-cert.pem: the only roots a peer's certificate may chain to. Empty when not loaded.</summary>
    public X509Certificate2Collection TrustedCas { get; }

    /// <summary>Our own certificate, with its private key; null for a client without one.</summary>
    public X509Certificate2? Certificate { get; }

    /// <summary>Certificates after the first in our certificate file, sent with it so the peer can build the chain.</summary>
    public X509Certificate2Collection Intermediates { get; }

    /// <summary>
    /// Loads server-cert.pem and server-key.pem, and ca-cert.pem (needed to verify client certificates;
    /// optional only for a server that does not ask for them).
    /// </summary>
    public static TlsCredentials LoadServer(string directory, bool requireCa = true)
    {
        CheckDirectory(directory);
        X509Certificate2Collection cas = requireCa || File.Exists(Path.Combine(directory, TlsFiles.CaCert))
            ? LoadCas(directory) : [];
        (X509Certificate2 leaf, X509Certificate2Collection intermediates) = LoadPair(directory, TlsFiles.ServerCert, TlsFiles.ServerKey);
        return new TlsCredentials(directory, cas, leaf, intermediates);
    }

    /// <summary>
    /// Loads ca-cert.pem (always: a client that cannot verify the server must not connect) and
    /// client-cert.pem / client-key.pem (required for mutual TLS, else loaded when present).
    /// </summary>
    public static TlsCredentials LoadClient(string directory, bool requireCertificate = true)
    {
        CheckDirectory(directory);
        X509Certificate2Collection cas = LoadCas(directory);
        bool present = File.Exists(Path.Combine(directory, TlsFiles.ClientCert)) || File.Exists(Path.Combine(directory, TlsFiles.ClientKey));
        if (!requireCertificate && !present)
        {
            return new TlsCredentials(directory, cas, null, []);
        }
        (X509Certificate2 leaf, X509Certificate2Collection intermediates) = LoadPair(directory, TlsFiles.ClientCert, TlsFiles.ClientKey);
        return new TlsCredentials(directory, cas, leaf, intermediates);
    }

    /// <summary>
    /// Builds credentials from certificates already in memory (tests, and nbd-certs' self-check). The
    /// caller keeps ownership: disposing these credentials leaves the certificates alone.
    /// </summary>
    public static TlsCredentials FromCertificates(X509Certificate2Collection trustedCas, X509Certificate2? certificate) =>
        new("(in memory)", trustedCas, certificate, [], owned: false);

    public void Dispose()
    {
        if (!_owned)
        {
            return;
        }
        Certificate?.Dispose();
        foreach (X509Certificate2 c in TrustedCas)
        {
            c.Dispose();
        }
        foreach (X509Certificate2 c in Intermediates)
        {
            c.Dispose();
        }
    }

    private static void CheckDirectory(string directory)
    {
        if (!System.IO.Directory.Exists(directory))
        {
            throw new TlsSetupException($"TLS directory '{directory}' does not exist");
        }
    }

    private static X509Certificate2Collection LoadCas(string directory)
    {
        string path = RequireFile(directory, TlsFiles.CaCert);
        var cas = new X509Certificate2Collection();
        try
        {
            cas.ImportFromPemFile(path);
        }
        catch (CryptographicException e)
        {
            throw new TlsSetupException($"{path}: not a PEM certificate ({e.Message})", e);
        }
        if (cas.Count == 0)
        {
            throw new TlsSetupException($"{path}: contains no certificate");
        }
        return cas;
    }

    private static (X509Certificate2 Leaf, X509Certificate2Collection Intermediates) LoadPair(string directory, string certName, string keyName)
    {
        string certPath = RequireFile(directory, certName);
        string keyPath = RequireFile(directory, keyName);
        X509Certificate2 leaf;
        try
        {
            leaf = X509Certificate2.CreateFromPemFile(certPath, keyPath);
        }
        catch (Exception e) when (e is CryptographicException or ArgumentException)
        {
            throw new TlsSetupException($"{certPath} with {keyPath}: cannot load ({e.Message}); the key must be an unencrypted PEM key matching the certificate", e);
        }
        if (OperatingSystem.IsWindows())
        {
            // SChannel cannot use the ephemeral key CreateFromPemFile gives; a PKCS#12 round trip makes
            // it persistent. OpenSSL on Linux uses the key as it is.
            using X509Certificate2 ephemeral = leaf;
            leaf = X509CertificateLoader.LoadPkcs12(ephemeral.Export(X509ContentType.Pkcs12), null);
        }
        var all = new X509Certificate2Collection();
        all.ImportFromPemFile(certPath);
        var intermediates = new X509Certificate2Collection();
        for (int i = 1; i < all.Count; i++)
        {
            intermediates.Add(all[i]);
        }
        all[0].Dispose();
        return (leaf, intermediates);
    }

    private static string RequireFile(string directory, string name)
    {
        string path = Path.Combine(directory, name);
        if (!File.Exists(path))
        {
            throw new TlsSetupException($"TLS directory '{directory}' has no {name}");
        }
        return path;
    }
}
