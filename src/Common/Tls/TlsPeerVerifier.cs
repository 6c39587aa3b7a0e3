using System.Globalization;
using System.Security.Cryptography;
using System.Security.Cryptography.X509Certificates;

namespace NbdServer.Common.Tls;

/// <summary>Which end of the link a certificate was presented by; decides the extended key usage it must allow.</summary>
public enum TlsPeerRole
{
    /// <summary>The peer is a server: its certificate must allow serverAuth.</summary>
    Server,

    /// <summary>The peer is a client: its certificate must allow clientAuth.</summary>
    Client,
}

/// <summary>
/// Decides whether a peer's certificate is acceptable. Trust comes only from ca-cert.pem
/// (<see cref="X509ChainTrustMode.CustomRootTrust"/>): the system's root store is never consulted, so
/// a certificate bought from a public CA for any name does not open a downstairs. Each check returns
/// null when the certificate passes, else one line saying why it does not.
/// </summary>
public static class TlsPeerVerifier
{
    private const string ServerAuthOid = "1.3.6.1.5.5.7.3.1";
    private const string ClientAuthOid = "1.3.6.1.5.5.7.3.2";
    private const int Sha256Length = 32;

    /// <summary>The chain policy every TLS link uses: our CA only, no revocation fetches, no downloads.</summary>
    public static X509ChainPolicy ChainPolicy(X509Certificate2Collection trustedCas, TlsPeerRole role, DateTimeOffset now, X509Certificate2Collection? extra = null)
    {
        var policy = new X509ChainPolicy
        {
            TrustMode = X509ChainTrustMode.CustomRootTrust,
            // No CRL/OCSP: our CA publishes none, and a fetch would let the network stall a handshake.
            // Revocation is done by a short leaf lifetime and, if needed, a new CA.
            RevocationMode = X509RevocationMode.NoCheck,
            DisableCertificateDownloads = true,
            VerificationTime = now.UtcDateTime,
        };
        policy.CustomTrustStore.AddRange(trustedCas);
        policy.ApplicationPolicy.Add(new Oid(role == TlsPeerRole.Server ? ServerAuthOid : ClientAuthOid));
        if (extra is not null)
        {
            policy.ExtraStore.AddRange(extra);
        }
        return policy;
    }

    /// <summary>
    /// Checks that <paramref name="certificate"/> is valid at <paramref name="now"/>, chains to one of
    /// <paramref name="trustedCas"/> (through <paramref name="intermediates"/> if any) and allows
    /// <paramref name="role"/>'s use.
    /// </summary>
    public static string? CheckChain(X509Certificate2 certificate, X509Certificate2Collection trustedCas, TlsPeerRole role, DateTimeOffset now,
        X509Certificate2Collection? intermediates = null)
    {
        string who = Describe(certificate);
        // Said first and plainly: an expired certificate is the common operator mistake.
        if (now.UtcDateTime > certificate.NotAfter.ToUniversalTime())
        {
            return $"certificate {who} expired on {certificate.NotAfter.ToUniversalTime().ToString("u", CultureInfo.InvariantCulture)}";
        }
        if (now.UtcDateTime < certificate.NotBefore.ToUniversalTime())
        {
            return $"certificate {who} is not valid before {certificate.NotBefore.ToUniversalTime().ToString("u", CultureInfo.InvariantCulture)} (check the clocks)";
        }
        using var chain = new X509Chain { ChainPolicy = ChainPolicy(trustedCas, role, now, intermediates) };
        try
        {
            if (!chain.Build(certificate))
            {
                X509ChainStatusFlags flags = X509ChainStatusFlags.NoError;
                foreach (X509ChainStatus status in chain.ChainStatus)
                {
                    flags |= status.Status;
                }
                if ((flags & (X509ChainStatusFlags.UntrustedRoot | X509ChainStatusFlags.PartialChain)) != 0)
                {
                    return $"certificate {who} is not issued by the CA in {TlsFiles.CaCert}";
                }
                if ((flags & X509ChainStatusFlags.NotValidForUsage) != 0)
                {
                    return $"certificate {who} is not for use by a TLS {(role == TlsPeerRole.Server ? "server" : "client")} (extended key usage)";
                }
                if ((flags & X509ChainStatusFlags.NotTimeValid) != 0)
                {
                    return $"certificate {who} or its issuer is outside its validity period";
                }
                string detail = string.Join("; ", chain.ChainStatus.Select(s => s.StatusInformation.Trim()).Where(s => s.Length > 0).Distinct());
                return $"certificate {who} does not verify: {flags}{(detail.Length > 0 ? $" ({detail})" : "")}";
            }
            // CustomRootTrust already guarantees this; checked again so a platform quirk cannot widen trust.
            X509Certificate2 root = chain.ChainElements[^1].Certificate;
            bool anchored = false;
            foreach (X509Certificate2 ca in trustedCas)
            {
                anchored |= ca.RawDataMemory.Span.SequenceEqual(root.RawDataMemory.Span);
            }
            return anchored ? null : $"certificate {who} is not issued by the CA in {TlsFiles.CaCert}";
        }
        finally
        {
            foreach (X509ChainElement element in chain.ChainElements)
            {
                if (!ReferenceEquals(element.Certificate, certificate))
                {
                    element.Certificate.Dispose();
                }
            }
        }
    }

    /// <summary>
    /// Checks a server certificate against the name the client expected: a DNS name must match a DNS
    /// subject alternative name (wildcards in the leftmost label allowed), an IP address must match an
    /// IP subject alternative name. The common name is not used, as browsers and GnuTLS do not either
    /// when alternative names are present.
    /// </summary>
    public static string? CheckServerName(X509Certificate2 certificate, string expectedName)
    {
        string name = expectedName.Trim('[', ']');
        return certificate.MatchesHostname(name, allowWildcards: true, allowCommonName: false)
            ? null
            : $"server certificate {Describe(certificate)} is not for '{expectedName}' (its names: {Printable(string.Join(", ", Names(certificate, includeCommonName: false)))}); set the expected name or a pin";
    }

    /// <summary>Checks a certificate's SHA-256 fingerprint (of the DER encoding) against a pin.</summary>
    public static string? CheckPin(X509Certificate2 certificate, ReadOnlySpan<byte> pin)
    {
        Span<byte> actual = stackalloc byte[Sha256Length];
        certificate.TryGetCertHash(HashAlgorithmName.SHA256, actual, out _);
        return CryptographicOperations.FixedTimeEquals(actual, pin)
            ? null
            : $"certificate {Describe(certificate)} has SHA-256 fingerprint {Fingerprint(certificate)}, not the pinned one";
    }

    /// <summary>
    /// Checks a client certificate against an allowlist of identities: its common name or any DNS
    /// subject alternative name must be listed. An empty list allows every client the CA issued.
    /// </summary>
    public static string? CheckAllowed(X509Certificate2 certificate, IReadOnlyCollection<string> allowed)
    {
        if (allowed.Count == 0)
        {
            return null;
        }
        foreach (string name in Names(certificate, includeCommonName: true))
        {
            if (allowed.Contains(name, StringComparer.Ordinal))
            {
                return null;
            }
        }
        return $"client certificate {Describe(certificate)} is not in the allowed client list";
    }

    /// <summary>The SHA-256 fingerprint as colon-separated upper-case hex, the form openssl and nbd-certs print.</summary>
    public static string Fingerprint(X509Certificate2 certificate)
    {
        Span<byte> hash = stackalloc byte[Sha256Length];
        certificate.TryGetCertHash(HashAlgorithmName.SHA256, hash, out _);
        return string.Join(':', hash.ToArray().Select(b => b.ToString("X2", CultureInfo.InvariantCulture)));
    }

    /// <summary>
    /// Parses a pin: 64 hex digits, optionally separated by colons, any case, optionally prefixed
    /// "sha256:" (so the output of openssl and of nbd-certs can be pasted as is).
    /// </summary>
    public static bool TryParsePin(string text, out byte[] pin)
    {
        string hex = text.Trim();
        if (hex.StartsWith("sha256:", StringComparison.OrdinalIgnoreCase) || hex.StartsWith("sha256/", StringComparison.OrdinalIgnoreCase))
        {
            hex = hex["sha256:".Length..];
        }
        hex = hex.Replace(":", "", StringComparison.Ordinal);
        pin = [];
        if (hex.Length != Sha256Length * 2)
        {
            return false;
        }
        try
        {
            pin = Convert.FromHexString(hex);
            return true;
        }
        catch (FormatException)
        {
            return false;
        }
    }

    /// <summary>The names a certificate carries: its common name (optionally) and its DNS and IP alternative names.</summary>
    public static IReadOnlyList<string> Names(X509Certificate2 certificate, bool includeCommonName)
    {
        var names = new List<string>();
        if (includeCommonName)
        {
            string cn = certificate.GetNameInfo(X509NameType.SimpleName, forIssuer: false);
            if (cn.Length > 0)
            {
                names.Add(cn);
            }
        }
        foreach (X509Extension extension in certificate.Extensions)
        {
            if (extension is X509SubjectAlternativeNameExtension san)
            {
                names.AddRange(san.EnumerateDnsNames());
                names.AddRange(san.EnumerateIPAddresses().Select(a => a.ToString()));
            }
        }
        return names;
    }

    /// <summary>
    /// How a certificate is named in a log line: its common name, quoted. The name comes from the peer,
    /// so control characters are replaced and the length is capped: a forged certificate must not be
    /// able to write fake log lines or flood one.
    /// </summary>
    public static string Describe(X509Certificate2 certificate)
    {
        string cn = certificate.GetNameInfo(X509NameType.SimpleName, forIssuer: false);
        return $"'{Printable(cn.Length > 0 ? cn : certificate.Subject)}'";
    }

    /// <summary>A peer's string made safe for one log line: control characters replaced, length capped.</summary>
    private static string Printable(string text)
    {
        string capped = text.Length > MaxLoggedNameLength ? text[..MaxLoggedNameLength] + "…" : text;
        return string.Create(capped.Length, capped, static (span, n) =>
        {
            for (int i = 0; i < n.Length; i++)
            {
                span[i] = char.IsControl(n[i]) ? '?' : n[i];
            }
        });
    }

    private const int MaxLoggedNameLength = 128;
}
