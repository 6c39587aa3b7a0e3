using System.CommandLine;
using System.Globalization;
using NbdServer.Common.Cli;
using NbdServer.Frontend.Qos;

namespace NbdServer.Frontend;

/// <summary>
/// The command line of <c>nbd-server</c> (System.CommandLine): serving is the root command, with the
/// settings of <see cref="ServeSettings"/>; status, scrub and repair talk to a running server.
/// </summary>
/// <remarks>
/// A new subcommand is three steps in <see cref="Create"/>: make a <see cref="Command"/> with its
/// options, give it an action (<c>SetAction(r => SomeCommand.RunAsync(r.Last(option), …))</c>; throw
/// <see cref="ArgumentException"/> for a bad value, that is exit 2), and <c>program.Add(command, doc)</c>.
/// Help, man page and bash completion follow from the tree.
/// </remarks>
internal static class FrontendCommandLine
{
    private static readonly Lazy<CliProgram> Shared = new(Create);

    /// <summary>The program's tree (built once; parsing does not change it).</summary>
    public static CliProgram Program => Shared.Value;

    /// <summary>Whether these arguments select the root command (serving), not a subcommand.</summary>
    public static bool Serves(IReadOnlyList<string> args) =>
        Program.Root.Parse(args, new ParserConfiguration { ResponseFileTokenReplacer = null }).CommandResult.Command == Program.Root;

    private const string ControlHelp =
        "the server's control socket (default: the first that exists of $RUNTIME_DIRECTORY/control.sock, /run/nbd-server/control.sock, $XDG_RUNTIME_DIR/nbd-server/control.sock); it is mode 0600, so run as root or as the server's user";

    private static CliProgram Create()
    {
        var program = new CliProgram("nbd-server", "a network block device server (NBD protocol, fixed newstyle)", new CommandDoc
        {
            Synopsis =
            [
                "nbd-server [OPTIONS]",
                "nbd-server --file PATH [--size SIZE] [OPTIONS]",
                "nbd-server --downstairs A:P,B:P,C:P [OPTIONS]",
                "nbd-server status [--control PATH] [--watch] [--json]",
                "nbd-server scrub [--control PATH] [--wait]",
                "nbd-server repair [--control PATH] [--rate-limit MIB] [--duty-cycle F]",
                "nbd-server qos [--control PATH] [--json]",
                "nbd-server qos set [--control PATH] [--export NAME] [--read-iops N] ... [--burst SECONDS]",
                "nbd-server completion bash",
            ],
            Description = """
                Serves one export over NBD. Clients: nbd-client (Linux kernel), nbdinfo, nbdsh,
                nbdcopy, nbdfuse, qemu-img, qemu-io, fio --ioengine=nbd. The export is also served
                under the empty name, so `nbdinfo nbd://127.0.0.1` needs no export name.
                """,
            Groups =
            [
                ("BACKEND (one of)", ServeSettings.Backend),
                ("REPLICATION (with --downstairs)", ServeSettings.Replication),
                ("QOS (per export, shared by all its connections; 0 = no limit)", ServeSettings.Qos),
                ("OPTIONS", [.. ServeSettings.Service, ServeSettings.Config]),
            ],
            Sections =
            [
                ("QOS LIMITS", """
                    A request over a limit waits (the server stops reading that client), it never fails;
                    one larger than a bucket still goes and borrows. FLUSH and BLOCK_STATUS are never
                    limited. Change the limits live with `nbd-server qos set` (through the control socket,
                    which a --file or --memory server opens only when --control is given).
                    """),
                ("SIZES", "Plain bytes or with a suffix: 4096, 64K, 512MiB, 8GiB."),
                ("CONFIGURATION", """
                    Every option above (except --help and --config) can also come from the config file, a
                    JSON object whose keys are the option names without dashes, or from an environment
                    variable NBD_SERVER_ + the name in capitals with underscores:
                        {"downstairs": "10.0.0.1:3810,10.0.0.2:3810,10.0.0.3:3810", "listen": "127.0.0.1:10809",
                         "max-outstanding-jobs": 900, "read-only": false}
                        NBD_SERVER_LISTEN=127.0.0.1:10809  NBD_SERVER_VERBOSE=true
                    The command line overrides the environment, which overrides the file. A bad or unknown
                    setting stops the server at start with one line naming it, where it was set and the
                    rule. See docs/configuration.md for every limit and its default.
                    """),
                ("SYSTEMD", """
                    Runs as a Type=notify service: READY=1 once the volume is serving (after reconciliation
                    and listen), STOPPING=1 on SIGTERM, WATCHDOG=1 every WATCHDOG_USEC/2 when WatchdogSec=
                    is set. Under the journal (JOURNAL_STREAM) log lines carry <N> syslog priorities and no
                    timestamps. SIGTERM drains in-flight requests and flushes before exit. SIGHUP (systemctl
                    reload) execs a new image of the process that takes every NBD connection over between
                    two requests (clients see a pause, not a disconnect; TLS sessions are closed).
                    """),
                ("EXIT STATUS", "0 clean shutdown, 1 runtime error (replicas unreachable, address in use), 2 bad usage or setting."),
            ],
        });
        RootCommand root = program.Root;
        foreach (Option option in ServeSettings.All)
        {
            root.Add(option);
        }
        root.Add(ServeSettings.Config);
        root.SetAction((result, cancel) => ServeHost.RunAsync(result));

        Option<string[]> control = Settings.Value("--control", "PATH", ControlHelp);
        Option<bool> watch = Settings.Flag("--watch", "refresh every second until Ctrl-C");
        Option<bool> json = Settings.Flag("--json", "print the raw JSON");
        var status = new Command("status", "show the replicated volume's replicas") { control, watch, json };
        status.SetAction((r, _) => StatusCommand.RunAsync(StatusCommand.Control(r.Last(control)), r.GetValue(watch), r.GetValue(json)));
        program.Add(status, new CommandDoc
        {
            Synopsis = ["nbd-server status [--control PATH] [--watch] [--json]"],
            Description = """
                Asks a running nbd-server (its control socket) for the state
                of each replica: in service, repairing or faulted; jobs and bytes outstanding; jobs
                completed per second; errors; faults and the last reason; live repair progress.
                """,
            Sections = [("EXIT STATUS", "0 shown, 1 no server answers, 2 usage error.")],
        });

        Option<string[]> scrubControl = Settings.Value("--control", "PATH", ControlHelp);
        Option<bool> wait = Settings.Flag("--wait", "wait for the scrub to finish and print its result");
        Option<string[]> timeout = Settings.Value("--timeout", "SECONDS", "give up waiting after this long (default 3600)");
        var scrub = new Command("scrub", "check every block of every replica, repair bad copies") { scrubControl, wait, timeout };
        scrub.SetAction((r, _) => StatusCommand.ScrubAsync(StatusCommand.Control(r.Last(scrubControl)), r.GetValue(wait), Number(r.Last(timeout), "--timeout") ?? 3600));
        program.Add(scrub, new CommandDoc
        {
            Synopsis = ["nbd-server scrub [--control PATH] [--wait] [--timeout SECONDS]"],
            Description = """
                A read checks only the copy it reads; rot in a copy nobody reads stays until a scrub.
                The scrub reads each extent from every replica in service, checks each block against
                that replica's stored hash and rewrites a bad block from a good copy, while guest IO
                goes on. Progress shows in `nbd-server status`.
                """,
            Sections = [("EXIT STATUS", "0 started (or, with --wait, finished), 1 no server or the scrub failed, 2 usage error.")],
        });

        Option<string[]> repairControl = Settings.Value("--control", "PATH", ControlHelp);
        Option<string[]> rateLimit = Settings.Value("--rate-limit", "MIB", "MiB/s each repaired replica may copy; 0 removes the limit");
        Option<string[]> dutyCycle = Settings.Value("--duty-cycle", "F",
            "share of the time in (0, 1] a repair keeps busy while the guest does IO; 1 copies flat out");
        var repair = new Command("repair", "show or change the pace of live repair and reconciliation") { repairControl, rateLimit, dutyCycle };
        repair.SetAction((r, _) => StatusCommand.RepairAsync(StatusCommand.Control(r.Last(repairControl)), Number(r.Last(rateLimit), "--rate-limit"), Number(r.Last(dutyCycle), "--duty-cycle")));
        program.Add(repair, new CommandDoc
        {
            Synopsis = ["nbd-server repair [--control PATH] [--rate-limit MIB] [--duty-cycle F]"],
            Description = """
                A replica that returns is caught up by copies that share the disks and links with the
                guest's IO. The pace bounds them: a rate limit per repaired replica, and the share of
                the time the repair keeps busy while the guest does IO. A change applies to the running
                repair within one chunk and to every later one; it lasts until the server restarts or reloads
                (set --repair-rate-limit / --repair-duty-cycle in the config to keep it). Without an
                option, prints the pace in force and each replica's repair.
                """,
            Sections = [("EXIT STATUS", "0 done, 1 no server or the server refused the value (the reason is printed), 2 usage error.")],
        });

        AddQos(program);

        // The torture verifier is its own executable now; a server holds no tools.
        var verify = new Command("verify", "moved to nbd-verify") { Hidden = true, TreatUnmatchedTokensAsErrors = false };
        verify.SetAction(r =>
        {
            r.InvocationConfiguration.Error.WriteLine("nbd-server: the verifier is a separate tool now: nbd-verify --uri nbd://HOST:PORT[/EXPORT] ...");
            return CliProgram.BadUsage;
        });
        program.Add(verify, new CommandDoc());
        return program.Seal();
    }

    /// <summary><c>nbd-server qos [--json]</c> and <c>nbd-server qos set LIMITS</c>.</summary>
    private static void AddQos(CliProgram program)
    {
        const string controlHelp = ControlHelp + ". A --file or --memory server has one only when it was started with --control";
        Option<string[]> control = Settings.Value("--control", "PATH", controlHelp);
        Option<bool> json = Settings.Flag("--json", "print the raw JSON");
        var qos = new Command("qos", "show or change the QoS limits of a running server's exports") { control, json };
        qos.SetAction((r, _) => QosCommand.ShowAsync(StatusCommand.Control(r.Last(control)), r.GetValue(json)));
        program.Add(qos, new CommandDoc
        {
            Synopsis = ["nbd-server qos [--control PATH] [--json]", "nbd-server qos set [--control PATH] [--export NAME] [--read-iops N] [--write-iops N] [--total-iops N] [--read-mbps MIB] [--write-mbps MIB] [--total-mbps MIB] [--burst SECONDS]"],
            Description = """
                Each export has limits on read, write and total operations and MiB per second, each a
                token bucket that holds --burst seconds of its limit. A request over a limit waits (the
                server stops reading that client, so it slows down); it never fails. All connections to
                an export share its buckets. Without `set`, prints each export's limits and how many
                requests waited, and how long. `set` changes only the limits it names (0 removes one),
                at once, also for requests already waiting; the change lasts until the server restarts
                or reloads (set the qos-* settings in the config to keep it).
                """,
            Sections = [("EXIT STATUS", "0 done, 1 no server or the server refused the value (the reason is printed), 2 usage error.")],
        });

        Option<string[]> setControl = Settings.Value("--control", "PATH", controlHelp);
        Option<string[]> export = Settings.Value("--export", "NAME", "the export to change (default: the first)");
        (string Key, Option<string[]> Option)[] limits =
        [
            (QosLimits.ReadIopsKey, Settings.Value("--" + QosLimits.ReadIopsKey, "N", "read operations per second")),
            (QosLimits.WriteIopsKey, Settings.Value("--" + QosLimits.WriteIopsKey, "N", "write operations per second (WRITE, TRIM, WRITE_ZEROES)")),
            (QosLimits.TotalIopsKey, Settings.Value("--" + QosLimits.TotalIopsKey, "N", "read and write operations together per second")),
            (QosLimits.ReadMbpsKey, Settings.Value("--" + QosLimits.ReadMbpsKey, "MIB", "MiB/s read")),
            (QosLimits.WriteMbpsKey, Settings.Value("--" + QosLimits.WriteMbpsKey, "MIB", "MiB/s written")),
            (QosLimits.TotalMbpsKey, Settings.Value("--" + QosLimits.TotalMbpsKey, "MIB", "MiB/s read and written together")),
            (QosLimits.BurstKey, Settings.Value("--" + QosLimits.BurstKey, "SECONDS", "seconds of each limit an idle client may spend at once")),
        ];
        var set = new Command("set", "change the QoS limits of an export; 0 removes a limit") { setControl, export };
        foreach ((_, Option<string[]> option) in limits)
        {
            set.Add(option);
        }
        set.SetAction((r, _) =>
        {
            var values = new List<(string Key, double Value)>();
            foreach ((string key, Option<string[]> option) in limits)
            {
                if (r.Last(option) is { } text)
                {
                    values.Add((key, double.TryParse(text, NumberStyles.AllowDecimalPoint, CultureInfo.InvariantCulture, out double value) && double.IsFinite(value)
                        ? value
                        : throw new ArgumentException($"qos set: --{key}: '{text}' is not a number (0 or more).")));
                }
            }
            if (values.Count == 0)
            {
                throw new ArgumentException("qos set: nothing to set; give one or more limits (see `nbd-server qos set --help`).");
            }
            return QosCommand.SetAsync(StatusCommand.Control(r.Last(setControl)), r.Last(export), values);
        });
        program.Add(set, new CommandDoc
        {
            Synopsis = ["nbd-server qos set [--control PATH] [--export NAME] [--read-iops N] [--write-iops N] [--total-iops N] [--read-mbps MIB] [--write-mbps MIB] [--total-mbps MIB] [--burst SECONDS]"],
            Description = """
                Changes only the limits it names (0 removes one), at once, also for requests already
                waiting, and prints the QoS that results. The change lasts until the server restarts
                or reloads (set the qos-* settings in the config to keep it).
                """,
            Sections = [("EXIT STATUS", "0 done, 1 no server or the server refused the value (the reason is printed), 2 usage error.")],
        }, qos);
    }

    private static double? Number(string? text, string option) => text is null ? null
        : double.TryParse(text, NumberStyles.AllowDecimalPoint, CultureInfo.InvariantCulture, out double value) ? value
        : throw new ArgumentException($"{option}: '{text}' is not a number.");
}
