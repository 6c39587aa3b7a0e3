using System.CommandLine;
using System.Globalization;
using System.Net;
using System.Net.Sockets;
using NbdServer.Common.Cli;

namespace NbdServer.Tools.Certs;

/// <summary>The command line of <c>nbd-certs</c> (System.CommandLine): ca, server, client, show.</summary>
internal static class CertsCommandLine
{
    private static readonly Lazy<CliProgram> Shared = new(() => Create(TimeProvider.System));

    public static CliProgram Program => Shared.Value;

    public static CliProgram Create(TimeProvider time)
    {
        var program = new CliProgram("nbd-certs", "make the CA and the TLS directories of nbd-server, nbd-downstairs and NBD clients", new CommandDoc
        {
            Synopsis =
            [
                "nbd-certs ca --dir DIR [--name NAME] [--days N] [--force]",
                "nbd-certs server --ca DIR --name NAME [--dns NAME]... [--ip ADDR]... --out DIR [--days N] [--force]",
                "nbd-certs client --ca DIR --name NAME --out DIR [--days N] [--force]",
                "nbd-certs show PATH",
            ],
            Description = """
                Makes a private CA and the TLS directories for nbd-server, nbd-downstairs and NBD clients.
                Directory layout (as qemu, nbdkit and libnbd read it): ca-cert.pem, server-cert.pem,
                server-key.pem, client-cert.pem, client-key.pem; keys are written with mode 0600.

                A server and a client certificate may share one OUT directory (nbd-server's host needs both).
                """,
            Sections = [("EXIT STATUS", "0 done, 1 failed (the message says why), 2 bad usage.")],
        });
        program.Root.SetAction(r =>
        {
            r.InvocationConfiguration.Error.WriteLine("nbd-certs: name a command: ca, server, client or show (see `nbd-certs --help`)");
            return CliProgram.BadUsage;
        });
        Option<bool> Force() => Settings.Flag("--force", "replace existing files (default: refuse)");
        Option<string> Single(string name, string helpName, string description) => new(name) { HelpName = helpName, Description = description };
        Option<string> Days(string lifetime) => Single("--days", "N", $"lifetime in days, 1 to {CertsCommand.MaxDays} (default {lifetime})");

        {
            Option<string> dir = Single("--dir", "DIR", "where to write ca-cert.pem and ca-key.pem");
            Option<string> name = Single("--name", "NAME", "the CA's common name (default nbd-server CA)");
            Option<string> days = Days("3652");
            Option<bool> force = Force();
            var ca = new Command("ca", "create a CA: DIR/ca-cert.pem and DIR/ca-key.pem") { dir, name, days, force };
            ca.SetAction(r => CertsCommand.Run("ca", Arguments(r, dir: dir, name: name, days: days, force: force), r.InvocationConfiguration.Output, r.InvocationConfiguration.Error, time));
            program.Add(ca, new CommandDoc
            {
                Synopsis = ["nbd-certs ca --dir DIR [--name NAME] [--days N] [--force]"],
                Description = "Keep DIR (the CA key) on one trusted machine; copy only ca-cert.pem elsewhere.",
            });
        }
        {
            Option<string> caDir = Single("--ca", "DIR", "the CA directory (from `nbd-certs ca`)");
            Option<string> name = Single("--name", "NAME", "the common name; when it is a host name or an address, also one of the certificate's names");
            Option<string[]> dns = Settings.Values("--dns", "NAME", "another host name the server is reached by (repeatable)");
            Option<string[]> ip = Settings.Values("--ip", "ADDR", "another address the server is reached by (repeatable)");
            Option<string> output = Single("--out", "DIR", "where to write ca-cert.pem, server-cert.pem and server-key.pem");
            Option<string> days = Days("365");
            Option<bool> force = Force();
            var server = new Command("server", "issue a server certificate (a downstairs host, or nbd-server's NBD port)") { caDir, name, dns, ip, output, days, force };
            server.SetAction(r => CertsCommand.Run("server", Arguments(r, ca: caDir, name: name, output: output, days: days, force: force, dns: dns, ip: ip), r.InvocationConfiguration.Output, r.InvocationConfiguration.Error, time));
            program.Add(server, new CommandDoc
            {
                Synopsis = ["nbd-certs server --ca DIR --name NAME [--dns NAME]... [--ip ADDR]... --out DIR [--days N] [--force]"],
                Description = "Clients check the name they connect to against the certificate's names; it prints the SHA-256 fingerprint (the value for downstairs-tls-pin).",
            });
        }
        {
            Option<string> caDir = Single("--ca", "DIR", "the CA directory (from `nbd-certs ca`)");
            Option<string> name = Single("--name", "NAME", "the identity a downstairs' tls-allow-client lists (e.g. upstairs)");
            Option<string> output = Single("--out", "DIR", "where to write ca-cert.pem, client-cert.pem and client-key.pem");
            Option<string> days = Days("365");
            Option<bool> force = Force();
            var client = new Command("client", "issue a client certificate (nbd-server towards its downstairs, or an NBD client)") { caDir, name, output, days, force };
            client.SetAction(r => CertsCommand.Run("client", Arguments(r, ca: caDir, name: name, output: output, days: days, force: force), r.InvocationConfiguration.Output, r.InvocationConfiguration.Error, time));
            program.Add(client, new CommandDoc { Synopsis = ["nbd-certs client --ca DIR --name NAME --out DIR [--days N] [--force]"] });
        }
        {
            var path = new Argument<string>("PATH") { HelpName = "PATH", Description = "a certificate file or a TLS directory" }.OptionsAreNotArguments();
            var show = new Command("show", "print certificates' names, validity and SHA-256 fingerprint") { path };
            show.SetAction(r =>
            {
                var parsed = new CertsCommand.Arguments();
                parsed.Positional.Add(r.GetValue(path)!);
                return CertsCommand.Run("show", parsed, r.InvocationConfiguration.Output, r.InvocationConfiguration.Error, time);
            });
            program.Add(show, new CommandDoc
            {
                Synopsis = ["nbd-certs show PATH"],
                Description = "For a TLS directory, each of ca-cert.pem, server-cert.pem and client-cert.pem that exists. The fingerprint is the value for downstairs-tls-pin.",
            });
        }
        return program.Seal();
    }

    private static CertsCommand.Arguments Arguments(ParseResult r, Option<string>? dir = null, Option<string>? ca = null, Option<string>? output = null,
        Option<string>? name = null, Option<string>? days = null, Option<bool>? force = null, Option<string[]>? dns = null, Option<string[]>? ip = null)
    {
        var a = new CertsCommand.Arguments
        {
            Dir = dir is null ? null : r.GetValue(dir),
            Ca = ca is null ? null : r.GetValue(ca),
            Out = output is null ? null : r.GetValue(output),
            Name = name is null ? null : r.GetValue(name),
            Force = force is not null && r.GetValue(force),
        };
        if (a.Name is { } n && string.IsNullOrWhiteSpace(n))
        {
            throw new ArgumentException("--name must not be empty");
        }
        if (days is not null && r.GetValue(days) is { } d)
        {
            a.Days = int.TryParse(d, NumberStyles.None, CultureInfo.InvariantCulture, out int value) && value >= 1 && value <= CertsCommand.MaxDays
                ? value
                : throw new ArgumentException($"--days must be a whole number from 1 to {CertsCommand.MaxDays}");
        }
        a.Dns.AddRange(dns is null ? [] : r.GetValue(dns) ?? []);
        foreach (string text in ip is null ? [] : r.GetValue(ip) ?? [])
        {
            a.Ips.Add(IPAddress.TryParse(text, out IPAddress? address) && address.AddressFamily is AddressFamily.InterNetwork or AddressFamily.InterNetworkV6
                ? address
                : throw new ArgumentException($"--ip '{text}' is not an IP address"));
        }
        return a;
    }
}
