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

    public const string Usage = """
        Usage: nbd-certs COMMAND [options]

        Makes a private CA and the TLS directories for nbd-server, nbd-downstairs and NBD clients.
        Directory layout (as qemu, nbdkit and libnbd read it): ca-cert.pem, server-cert.pem,
        server-key.pem, client-cert.pem, client-key.pem; keys are written with mode 0600.

        Commands:
          ca --dir DIR [--name NAME] [--days N]
              Create a CA: DIR/ca-cert.pem and DIR/ca-key.pem. Keep DIR (the CA key) on one
              trusted machine; copy only ca-cert.pem elsewhere. Default lifetime 3652 days.
          server --ca DIR --name NAME [--dns NAME]... [--ip ADDR]... --out DIR [--days N]
              Issue a server certificate (a downstairs host, or nbd-server's NBD port) into OUT:
              ca-cert.pem, server-cert.pem, server-key.pem. NAME is its common name and, when it is
              a host name or an address, also one of its names; --dns and --ip add more. Clients
              check the name they connect to against these. Default lifetime 365 days.
          client --ca DIR --name NAME --out DIR [--days N]
              Issue a client certificate (nbd-server towards its downstairs, or an NBD client) into
              OUT: ca-cert.pem, client-cert.pem, client-key.pem. NAME is the identity a downstairs'
              tls-allow-client lists. Default lifetime 365 days.
          show PATH
              Print a certificate's (or each certificate in a TLS directory's) names, validity and
              SHA-256 fingerprint (the value for downstairs-tls-pin).

        Options:
          --force    replace existing files (default: refuse)
          -h, --help this text

        A server and a client certificate may share one OUT directory (nbd-server's host needs both).
        Exit codes: 0 done, 1 failed (message says why), 2 bad usage.
        """;

    public static int Run(IReadOnlyList<string> args, TextWriter stdout, TextWriter stderr, TimeProvider time)
    {
        if (args.Count == 0 || args[0] is "-h" or "--help" or "help")
        {
            (args.Count == 0 ? stderr : stdout).WriteLine(Usage);
            return args.Count == 0 ? BadUsage : Ok;
        }
        if (!TryParse(args.Skip(1).ToList(), out Arguments parsed, out string? error))
        {
            return Bad(stderr, error);
        }
        if (parsed.Help)
        {
            stdout.WriteLine(Usage);
            return Ok;
        }
        try
        {
            return args[0] switch
            {
                "ca" => Ca(parsed, stdout, stderr, time),
                "server" => Server(parsed, stdout, stderr, time),
                "client" => Client(parsed, stdout, stderr, time),
                "show" => Show(parsed, stdout, stderr),
                _ => Bad(stderr, $"unknown command '{args[0]}'"),
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
        stderr.WriteLine($"nbd-certs: {message}");
        stderr.WriteLine("Run 'nbd-certs --help' for usage.");
        return BadUsage;
    }

    private sealed class Arguments
    {
        public string? Dir { get; set; }
        public string? Ca { get; set; }
        public string? Out { get; set; }
        public string? Name { get; set; }
        public int? Days { get; set; }
        public bool Force { get; set; }
        public bool Help { get; set; }
        public List<string> Dns { get; } = [];
        public List<IPAddress> Ips { get; } = [];
        public List<string> Positional { get; } = [];
    }

    /// <summary>Longest lifetime accepted: beyond it a typo (days for hours…) is likelier than intent.</summary>
    private const int MaxDays = 36_525;

    private static bool TryParse(List<string> args, out Arguments parsed, out string? error)
    {
        parsed = new Arguments();
        error = null;
        for (int i = 0; i < args.Count; i++)
        {
            string arg = args[i];
            if (arg is "--force")
            {
                parsed.Force = true;
                continue;
            }
            if (arg is "-h" or "--help")
            {
                parsed.Help = true;
                continue;
            }
            if (!arg.StartsWith("--", StringComparison.Ordinal))
            {
                parsed.Positional.Add(arg);
                continue;
            }
            if (i + 1 >= args.Count)
            {
                error = $"{arg} needs a value";
                return false;
            }
            string value = args[++i];
            switch (arg)
            {
                case "--dir" when parsed.Dir is null:
                    parsed.Dir = value;
                    break;
                case "--ca" when parsed.Ca is null:
                    parsed.Ca = value;
                    break;
                case "--out" when parsed.Out is null:
                    parsed.Out = value;
                    break;
                case "--name" when parsed.Name is null:
                    if (string.IsNullOrWhiteSpace(value))
                    {
                        error = "--name must not be empty";
                        return false;
                    }
                    parsed.Name = value;
                    break;
                case "--days" when parsed.Days is null:
                    if (!int.TryParse(value, NumberStyles.None, CultureInfo.InvariantCulture, out int days) || days < 1 || days > MaxDays)
                    {
                        error = $"--days must be a whole number from 1 to {MaxDays}";
                        return false;
                    }
                    parsed.Days = days;
                    break;
                case "--dns":
                    parsed.Dns.Add(value);
                    break;
                case "--ip":
                    if (!IPAddress.TryParse(value, out IPAddress? ip) || ip.AddressFamily is not (AddressFamily.InterNetwork or AddressFamily.InterNetworkV6))
                    {
                        error = $"--ip '{value}' is not an IP address";
                        return false;
                    }
                    parsed.Ips.Add(ip);
                    break;
                case "--dir" or "--ca" or "--out" or "--name" or "--days":
                    error = $"{arg} given twice";
                    return false;
                default:
                    error = $"unknown option {arg}";
                    return false;
            }
        }
        return true;
    }
}
