using System.Globalization;
using System.Net;
using System.Net.Sockets;
using System.Security.Cryptography.X509Certificates;
using NbdServer.Common.Tls;

namespace NbdServer.Tools.Certs;

/// <summary>
/// nbd-certs: makes the CA and the per-host TLS directories for a replicated volume, in the layout
/// our daemons, qemu, nbdkit and libnbd all read (ca-cert.pem, server-cert.pem, server-key.pem,
/// client-cert.pem, client-key.pem; keys 0600).
/// </summary>
internal static class CertsCommand
{
    public const int Ok = 0;
    public const int Failed = 1;
    public const int BadUsage = 2;

    /// <summary><c>nbd-certs ARGS</c>, parsed by <see cref="CertsCommandLine"/>; <paramref name="time"/> dates the certificates.</summary>
    public static int Run(IReadOnlyList<string> args, TextWriter stdout, TextWriter stderr, TimeProvider time) =>
        CertsCommandLine.Create(time).Run(args, stdout, stderr);

    /// <summary>Runs one command; usage errors found here are one line and exit 2, failures exit 1.</summary>
    internal static int Run(string command, Arguments parsed, TextWriter stdout, TextWriter stderr, TimeProvider time)
    {
        try
        {
            return command switch
            {
                "ca" => Ca(parsed, stdout, stderr, time),
                "server" => Server(parsed, stdout, stderr, time),
                "client" => Client(parsed, stdout, stderr, time),
                _ => Show(parsed, stdout, stderr),
            };
        }
        catch (Exception e) when (e is TlsSetupException or IOException or UnauthorizedAccessException or ArgumentException)
        {
            stderr.WriteLine($"nbd-certs: {e.Message}");
            return Failed;
        }
    }

    private static int Ca(Arguments a, TextWriter stdout, TextWriter stderr, TimeProvider time)
    {
        if (a.Dir is null || a.Ca is not null || a.Out is not null || a.Dns.Count > 0 || a.Ips.Count > 0 || a.Positional.Count > 0)
        {
            return Bad(stderr, "ca takes --dir DIR [--name NAME] [--days N]");
        }
        TimeSpan lifetime = a.Days is { } d ? TimeSpan.FromDays(d) : TlsCertificates.DefaultCaLifetime;
        using X509Certificate2 ca = TlsCertificates.CreateCa(a.Name ?? "nbd-server CA", CertificateValidity.Starting(time.GetUtcNow(), lifetime));
        TlsCertificates.WriteCa(a.Dir, ca, a.Force);
        stdout.WriteLine($"nbd-certs: CA {TlsPeerVerifier.Describe(ca)} in {a.Dir} ({TlsFiles.CaCert}, {TlsFiles.CaKey}), valid until {Date(ca.NotAfter)}");
        return Ok;
    }

    private static int Server(Arguments a, TextWriter stdout, TextWriter stderr, TimeProvider time)
    {
        if (a.Ca is null || a.Name is null || a.Out is null || a.Dir is not null || a.Positional.Count > 0)
        {
            return Bad(stderr, "server takes --ca DIR --name NAME [--dns NAME]... [--ip ADDR]... --out DIR [--days N]");
        }
        var dns = new List<string>();
        var ips = new List<IPAddress>();
        if (IPAddress.TryParse(a.Name, out IPAddress? nameIp))
        {
            ips.Add(nameIp);
        }
        else if (Uri.CheckHostName(a.Name) == UriHostNameType.Dns)
        {
            dns.Add(a.Name);
        }
        foreach (string name in a.Dns)
        {
            if (Uri.CheckHostName(name) != UriHostNameType.Dns && !name.StartsWith("*.", StringComparison.Ordinal))
            {
                return Bad(stderr, $"--dns '{name}' is not a host name");
            }
            if (!dns.Contains(name, StringComparer.OrdinalIgnoreCase))
            {
                dns.Add(name);
            }
        }
        foreach (IPAddress ip in a.Ips)
        {
            if (!ips.Contains(ip))
            {
                ips.Add(ip);
            }
        }
        if (dns.Count == 0 && ips.Count == 0)
        {
            return Bad(stderr, $"server '{a.Name}' needs a host name or address: give --dns or --ip");
        }
        using X509Certificate2 ca = TlsCertificates.LoadCa(a.Ca);
        TimeSpan lifetime = a.Days is { } d ? TimeSpan.FromDays(d) : TlsCertificates.DefaultLeafLifetime;
        using X509Certificate2 server = TlsCertificates.CreateServer(ca, a.Name, dns, ips, CertificateValidity.Starting(time.GetUtcNow(), lifetime));
        TlsCertificates.WriteServer(a.Out, ca, server, a.Force);
        stdout.WriteLine($"nbd-certs: server {TlsPeerVerifier.Describe(server)} for {string.Join(", ", dns.Concat(ips.Select(i => i.ToString())))} in {a.Out}, valid until {Date(server.NotAfter)}");
        stdout.WriteLine($"nbd-certs: SHA-256 fingerprint {TlsPeerVerifier.Fingerprint(server)}");
        return Ok;
    }

    private static int Client(Arguments a, TextWriter stdout, TextWriter stderr, TimeProvider time)
    {
        if (a.Ca is null || a.Name is null || a.Out is null || a.Dir is not null || a.Dns.Count > 0 || a.Ips.Count > 0 || a.Positional.Count > 0)
        {
            return Bad(stderr, "client takes --ca DIR --name NAME --out DIR [--days N]");
        }
        using X509Certificate2 ca = TlsCertificates.LoadCa(a.Ca);
        TimeSpan lifetime = a.Days is { } d ? TimeSpan.FromDays(d) : TlsCertificates.DefaultLeafLifetime;
        using X509Certificate2 client = TlsCertificates.CreateClient(ca, a.Name, CertificateValidity.Starting(time.GetUtcNow(), lifetime));
        TlsCertificates.WriteClient(a.Out, ca, client, a.Force);
        stdout.WriteLine($"nbd-certs: client {TlsPeerVerifier.Describe(client)} in {a.Out}, valid until {Date(client.NotAfter)}");
        return Ok;
    }

    private static int Show(Arguments a, TextWriter stdout, TextWriter stderr)
    {
        if (a.Positional.Count != 1 || a.Dir is not null || a.Ca is not null || a.Out is not null || a.Name is not null)
        {
            return Bad(stderr, "show takes one PATH (a certificate file or a TLS directory)");
        }
        string path = a.Positional[0];
        IEnumerable<string> files = Directory.Exists(path)
            ? new[] { TlsFiles.CaCert, TlsFiles.ServerCert, TlsFiles.ClientCert }.Select(f => Path.Combine(path, f)).Where(File.Exists)
            : [path];
        int shown = 0;
        foreach (string file in files)
        {
            var certificates = new X509Certificate2Collection();
            certificates.ImportFromPemFile(file);
            foreach (X509Certificate2 c in certificates)
            {
                stdout.WriteLine($"{file}: {TlsPeerVerifier.Describe(c)} issued by '{c.GetNameInfo(X509NameType.SimpleName, forIssuer: true)}'");
                stdout.WriteLine($"  names: {string.Join(", ", TlsPeerVerifier.Names(c, includeCommonName: false))}");
                stdout.WriteLine($"  valid: {Date(c.NotBefore)} to {Date(c.NotAfter)}");
                stdout.WriteLine($"  sha256: {TlsPeerVerifier.Fingerprint(c)}");
                c.Dispose();
                shown++;
            }
        }
        if (shown == 0)
        {
            stderr.WriteLine($"nbd-certs: no certificate in {path}");
            return Failed;
        }
        return Ok;
    }

    private static string Date(DateTime value) => value.ToUniversalTime().ToString("yyyy-MM-dd HH:mm 'UTC'", CultureInfo.InvariantCulture);

    private static int Bad(TextWriter stderr, string? message)
    {
        stderr.WriteLine($"nbd-certs: {message} (see `nbd-certs --help`)");
        return BadUsage;
    }

    internal sealed class Arguments
    {
        public string? Dir { get; set; }
        public string? Ca { get; set; }
        public string? Out { get; set; }
        public string? Name { get; set; }
        public int? Days { get; set; }
        public bool Force { get; set; }
        public List<string> Dns { get; } = [];
        public List<IPAddress> Ips { get; } = [];
        public List<string> Positional { get; } = [];
    }

    /// <summary>Longest lifetime accepted: beyond it a typo (days for hours…) is likelier than intent.</summary>
    internal const int MaxDays = 36_525;
}
