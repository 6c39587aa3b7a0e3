using System.Globalization;
using System.Net;
using NbdServer.Common.Hosting;
using NbdServer.Common.Text;
using NbdServer.Common.Tls;
using NbdServer.Frontend.Server;
using NbdServer.ReplicaEngine;

namespace NbdServer.Frontend;

/// <summary>The command line of <c>nbd-server</c>, parsed into settings (or a clear error).</summary>
internal sealed record ServeCommand
{
    public const string DefaultExportName = "vol0";
    public const long DefaultMemorySize = 1L << 30;
    public const string DefaultConfigFile = "/etc/nbd-server/nbd-server.json";
    public const string EnvironmentPrefix = "NBD_SERVER_";

    /// <summary>Options that take no value (true/false in a config file or the environment).</summary>
    public static readonly IReadOnlySet<string> Flags = new HashSet<string>(StringComparer.Ordinal) { "--read-only", "--verbose", "--insecure", "--tls-verify-client" };

    public const string Usage = """
        nbd-server - a network block device server (NBD protocol, fixed newstyle)

        SYNOPSIS
            nbd-server [OPTIONS]
            nbd-server --file PATH [--size SIZE] [OPTIONS]
            nbd-server --downstairs A:P,B:P,C:P [OPTIONS]
            nbd-server status [--control PATH] [--watch] [--json]
            nbd-server scrub [--control PATH] [--wait]
            nbd-server repair [--control PATH] [PACE]   (see `nbd-server repair --help`)
            nbd-server qos [set LIMITS] [--control PATH]   (see `nbd-server qos --help`)

        DESCRIPTION
            Serves one export over NBD. Clients: nbd-client (Linux kernel), nbdinfo, nbdsh,
            nbdcopy, nbdfuse, qemu-img, qemu-io, fio --ioengine=nbd. The export is also served
            under the empty name, so `nbdinfo nbd://127.0.0.1` needs no export name.

        BACKEND (one of)
            --downstairs A:P,B:P,C:P the replicated volume: three nbd-downstairs servers; writes are
                                     acknowledged once two replicas have them (see README)
            --memory SIZE            a sparse in-memory volume (default, 1GiB)
            --file PATH              a file or block device; created sparse when --size is given
            --size SIZE              size of a file to create (an existing file must match)

        REPLICATION (with --downstairs)
            --generation N           activation generation (default: one above the highest any
                                     replica has seen; two upstairs must never share one)
            --control PATH           the control socket (status, scrub, repair pace, QoS), mode 0600
                                     (default $RUNTIME_DIRECTORY/control.sock under systemd, else
                                     /run/nbd-server/control.sock if writable, else
                                     $XDG_RUNTIME_DIR/nbd-server/control.sock; see `nbd-server status`).
                                     A --file or --memory server opens one (for QoS) only when given
            --max-generation-step N  a replica whose highest generation is more than this above
                                     every other's is left out of activation (default 1000000;
                                     keep it equal to the downstairs' --max-generation-step)
            --max-flush-step N       a replica whose highest flush number is more than this above
                                     every other's is left out of activation (default 2^40; keep
                                     it equal to the downstairs' --max-flush-step)
            --max-outstanding-jobs N jobs one replica may owe before it is faulted (default 900)
            --max-outstanding-bytes SIZE
                                     bytes one replica may owe before it is faulted (default 64MiB)
            --no-progress-timeout SECONDS
                                     a replica that completes nothing this long is faulted (default 5)
            --degraded-write-timeout SECONDS
                                     with one replica left, writes wait this long then fail EIO (default 3)
            --scrub-interval SECONDS check every block of every replica this often, rewriting bad
                                     copies (default 604800 = 7 days; 0 = only `nbd-server scrub`)
            --repair-rate-limit MIB  most MiB/s one replica's repair copies (default 0 = no limit)
            --repair-duty-cycle D    share of the time a repair keeps busy while the guest does IO,
                                     0 < D <= 1 (default 0.5; flat out while the guest is idle)
            --repair-parallelism N   extents one repair copies at a time (default 4)
            --change-record-max-bytes SIZE
                                     most a changed-block record may mark for a replica out of
                                     service; past it the record is dropped and the replica's
                                     repair compares extents (default 16GiB; 0 = no record)
            --change-record-granule SIZE
                                     granule of that record (default 4KiB)
            --downstairs-tls-dir DIR mutual TLS to the downstairs: DIR holds ca-cert.pem,
                                     client-cert.pem and client-key.pem (make them with nbd-certs);
                                     each downstairs must present a certificate from that CA.
                                     Default: plaintext, refused unless every downstairs is on
                                     127.0.0.0/8 or ::1
            --downstairs-tls-name NAME,...
                                     the name each downstairs' certificate must carry: one for
                                     all or one per downstairs (default: each address given to
                                     the downstairs option, then an IP name in its certificate)
            --downstairs-tls-pin SHA256,...
                                     accept a downstairs only with this certificate fingerprint,
                                     one for all or one per downstairs (`nbd-certs show` prints
                                     it); replaces the name check
            --insecure               allow plaintext links to downstairs on other hosts, and an
                                     NBD listen on a non-loopback address without --tls require
                                     and --tls-verify-client

        QOS (per export, shared by all its connections; 0 = no limit)
            A request over a limit waits (the server stops reading that client), it never fails;
            one larger than a bucket still goes and borrows. FLUSH and BLOCK_STATUS are never
            limited. Change the limits live with `nbd-server qos set` (through the control socket,
            which a --file or --memory server opens only when --control is given).
            --qos-read-iops N        read operations per second
            --qos-write-iops N       write operations per second (WRITE, TRIM, WRITE_ZEROES)
            --qos-total-iops N       read and write operations together per second
            --qos-read-mbps MIB      MiB/s read
            --qos-write-mbps MIB     MiB/s written (WRITE_ZEROES counts its length where the volume
                                     writes the zeroes: a replicated volume)
            --qos-total-mbps MIB     MiB/s read and written together
            --qos-burst SECONDS      each limit's bucket holds this many seconds of it: what an idle
                                     client may spend at once (default 1)

        OPTIONS
            --listen ADDR:PORT       where to listen (default 127.0.0.1:10809; `none`: only the
                                     Unix socket). A non-loopback address needs --tls require
                                     and --tls-verify-client (or --insecure)
            --unix PATH              also serve NBD on a Unix socket (the way for a client on this
                                     host: nbd-client -unix PATH /dev/nbd0, nbd+unix:///vol0?socket=PATH);
                                     a stale socket file is replaced, the file is removed at exit
            --unix-mode MODE         permissions of the Unix socket, octal (default 0600: the
                                     service user and root; 0660 admits the socket's group)
            --tls MODE               off, on (clients may use STARTTLS) or require (every option
                                     but STARTTLS is refused with ERR_TLS_REQD until TLS is up)
                                     (default off)
            --tls-dir DIR            server-cert.pem and server-key.pem, and ca-cert.pem to
                                     verify client certificates with; make them with nbd-certs
            --tls-verify-client      require a client certificate that chains to DIR/ca-cert.pem
            --payload-timeout SECONDS
                                     a WRITE's payload must arrive within this long of its header,
                                     else the connection is closed and its budget returned (default 60)
            --send-timeout SECONDS   replies not taken by the client within this long close the
                                     connection and return its budget (default 30)
            --export NAME            export name (default vol0)
            --description TEXT       description shown by `nbdinfo --list`
            --read-only              refuse writes (EPERM), advertise READ_ONLY
            --max-payload SIZE       largest READ/WRITE accepted (default 32MiB)
            --max-inflight-bytes-per-connection SIZE
                                     payload bytes one connection may hold (default 64MiB)
            --max-inflight-bytes SIZE
                                     payload bytes all connections may hold (default 512MiB)
            --max-requests-per-connection N
                                     requests in flight per connection (default 256)
            --max-connections N      concurrent clients, counted separately on TCP and on the Unix
                                     socket (default 256 each)
            --verbose                log every connection and option at debug level
            --log-interval SECONDS   repeated errors are summarised once per interval (default 5)
            --log-json FILE          also write every log event as one JSON object per line to FILE
            --metrics ADDR:PORT      serve Prometheus metrics on http://ADDR:PORT/metrics (off by
                                     default; use 127.0.0.1): meters NbdServer.Frontend,
                                     NbdServer.ReplicaEngine, System.Runtime
            --http-max-connections N requests the control socket and the metrics endpoint each
                                     serve at once; more are closed at once (default 8)
            --http-timeout SECONDS   time one control or metrics request may take, reading the
                                     request and sending the answer (default 5)
            --config FILE            read settings from FILE (default /etc/nbd-server/nbd-server.json
                                     if it exists)
            -h, --help               this text

        SIZES
            Plain bytes or with a suffix: 4096, 64K, 512MiB, 8GiB.

        CONFIGURATION
            Every option above (except --help and --config) can also come from the config file, a
            JSON object whose keys are the option names without dashes, or from an environment
            variable NBD_SERVER_ + the name in capitals with underscores:
                {"downstairs": "10.0.0.1:3810,10.0.0.2:3810,10.0.0.3:3810", "listen": "127.0.0.1:10809",
                 "max-outstanding-jobs": 900, "read-only": false}
                NBD_SERVER_LISTEN=127.0.0.1:10809  NBD_SERVER_VERBOSE=true
            The command line overrides the environment, which overrides the file. A bad or unknown
            setting stops the server at start with a message naming it and where it was set.
            See docs/configuration.md for every limit and its default.

        SYSTEMD
            Runs as a Type=notify service: READY=1 once the volume is serving (after reconciliation
            and listen), STOPPING=1 on SIGTERM, WATCHDOG=1 every WATCHDOG_USEC/2 when WatchdogSec=
            is set. Under the journal (JOURNAL_STREAM) log lines carry <N> syslog priorities and no
            timestamps. SIGTERM drains in-flight requests and flushes before exit. SIGHUP (systemctl
            reload) execs a new image of the process that takes every NBD connection over between
            two requests (clients see a pause, not a disconnect; TLS sessions are closed).

        EXIT STATUS
            0 clean shutdown, 1 runtime error (replicas unreachable, address in use), 2 bad usage or setting.
        """;

    public FrontendOptions Frontend { get; init; } = new();

    public string ExportName { get; init; } = DefaultExportName;

    public string Description { get; init; } = "";

    public string? FilePath { get; init; }

    public long? Size { get; init; }

    public bool ReadOnly { get; init; }

    public bool Verbose { get; init; }

    public bool Help { get; init; }

    public string? LogJson { get; init; }

    public IPEndPoint? Metrics { get; init; }

    public EngineOptions? Engine { get; init; }

    /// <summary>The control socket's path; null: <see cref="Server.ControlServer.DefaultPath"/>.</summary>
    public string? Control { get; init; }

    /// <summary>Connection cap and deadline of the control socket and the metrics endpoint.</summary>
    public LocalHttpLimits Http { get; init; } = new();

    public static ServeCommand Parse(IReadOnlyList<string> args)
    {
        var command = new ServeCommand();
        var frontend = new FrontendOptions();
        bool insecure = false;
        for (int i = 0; i < args.Count; i++)
        {
            string arg = args[i];
            string Value()
            {
                if (i + 1 >= args.Count)
                {
                    throw new ArgumentException($"{arg} needs a value.");
                }
                return args[++i];
            }
            switch (arg)
            {
                case "-h" or "--help":
                    command = command with { Help = true };
                    break;
                case "--listen":
                    {
                        string listen = Value();
                        frontend = frontend with { Listen = listen == "none" ? null : ParseEndPoint(listen, arg) };
                        break;
                    }
                case "--unix":
                    frontend = frontend with { UnixSocketPath = Value() };
                    break;
                case "--unix-mode":
                    frontend = frontend with { UnixSocketMode = Value() };
                    break;
                case "--tls":
                    {
                        string mode = Value();
                        frontend = frontend with
                        {
                            Tls = mode switch
                            {
                                "off" => TlsMode.Off,
                                "on" => TlsMode.On,
                                "require" => TlsMode.Require,
                                _ => throw new ArgumentException($"{arg}: '{mode}' is not off, on or require."),
                            },
                        };
                        break;
                    }
                case "--tls-dir":
                    frontend = frontend with { TlsDir = Value() };
                    break;
                case "--tls-verify-client":
                    frontend = frontend with { TlsVerifyClient = true };
                    break;
                case "--payload-timeout":
                    frontend = frontend with { PayloadTimeout = TimeSpan.FromSeconds(ParseSeconds(Value(), arg)) };
                    break;
                case "--send-timeout":
                    frontend = frontend with { SendTimeout = TimeSpan.FromSeconds(ParseSeconds(Value(), arg)) };
                    break;
                case "--export":
                    command = command with { ExportName = Value() };
                    break;
                case "--description":
                    command = command with { Description = Value() };
                    break;
                case "--memory":
                    command = command with { Size = ByteSize.Parse(Value(), arg), FilePath = null };
                    break;
                case "--file":
                    command = command with { FilePath = Value() };
                    break;
                case "--size":
                    command = command with { Size = ByteSize.Parse(Value(), arg) };
                    break;
                case "--read-only":
                    command = command with { ReadOnly = true };
                    break;
                case "--max-payload":
                    frontend = frontend with { MaxPayloadBytes = checked((int)ByteSize.Parse(Value(), arg)) };
                    break;
                case "--max-inflight-bytes-per-connection":
                    frontend = frontend with { MaxInFlightBytesPerConnection = ByteSize.Parse(Value(), arg) };
                    break;
                case "--max-inflight-bytes":
                    frontend = frontend with { MaxInFlightBytesTotal = ByteSize.Parse(Value(), arg) };
                    break;
                case "--max-requests-per-connection":
                    frontend = frontend with { MaxInFlightRequestsPerConnection = ParseInt(Value(), arg) };
                    break;
                case "--max-connections":
                    frontend = frontend with { MaxConnections = ParseInt(Value(), arg) };
                    break;
                case "--downstairs":
                    command = command with { Engine = (command.Engine ?? new EngineOptions()) with { Downstairs = [.. Value().Split(',').Select(e => ParseEndPoint(e.Trim(), arg))] } };
                    break;
                case "--generation":
                    command = command with { Engine = (command.Engine ?? new EngineOptions()) with { Generation = ulong.Parse(Value(), NumberStyles.None, CultureInfo.InvariantCulture) } };
                    break;
                case "--max-generation-step":
                    command = command with { Engine = (command.Engine ?? new EngineOptions()) with { MaxGenerationStep = ulong.Parse(Value(), NumberStyles.None, CultureInfo.InvariantCulture) } };
                    break;
                case "--max-flush-step":
                    command = command with { Engine = (command.Engine ?? new EngineOptions()) with { MaxFlushStep = ulong.Parse(Value(), NumberStyles.None, CultureInfo.InvariantCulture) } };
                    break;
                case "--control":
                    command = command with { Control = ParseControlPath(Value(), arg) };
                    break;
                case "--http-max-connections":
                    command = command with { Http = command.Http with { MaxConnections = ParseInt(Value(), arg) } };
                    break;
                case "--http-timeout":
                    command = command with { Http = command.Http with { Timeout = TimeSpan.FromSeconds(ParseSeconds(Value(), arg)) } };
                    break;
                case "--max-outstanding-jobs":
                    command = command with { Engine = (command.Engine ?? new EngineOptions()) with { MaxOutstandingJobs = ParseInt(Value(), arg) } };
                    break;
                case "--max-outstanding-bytes":
                    command = command with { Engine = (command.Engine ?? new EngineOptions()) with { MaxOutstandingBytes = ByteSize.Parse(Value(), arg) } };
                    break;
                case "--no-progress-timeout":
                    command = command with { Engine = (command.Engine ?? new EngineOptions()) with { NoProgressTimeout = TimeSpan.FromSeconds(ParseSeconds(Value(), arg)) } };
                    break;
                case "--scrub-interval":
                    command = command with { Engine = (command.Engine ?? new EngineOptions()) with { ScrubInterval = TimeSpan.FromSeconds(ParseSecondsOrZero(Value(), arg)) } };
                    break;
                case "--repair-rate-limit":
                    command = command with { Engine = (command.Engine ?? new EngineOptions()) with { RepairRateLimit = ParseNumber(Value(), arg) } };
                    break;
                case "--repair-duty-cycle":
                    command = command with { Engine = (command.Engine ?? new EngineOptions()) with { RepairDutyCycle = ParseNumber(Value(), arg) } };
                    break;
                case "--repair-parallelism":
                    command = command with { Engine = (command.Engine ?? new EngineOptions()) with { RepairParallelism = ParseInt(Value(), arg) } };
                    break;
                case "--change-record-max-bytes":
                    command = command with { Engine = (command.Engine ?? new EngineOptions()) with { ChangeRecordMaxBytes = ByteSize.Parse(Value(), arg) } };
                    break;
                case "--change-record-granule":
                    command = command with { Engine = (command.Engine ?? new EngineOptions()) with { ChangeRecordGranuleBytes = checked((int)ByteSize.Parse(Value(), arg)) } };
                    break;
                case "--downstairs-tls-dir":
                    command = command with { Engine = (command.Engine ?? new EngineOptions()) with { DownstairsTlsDir = Value() } };
                    break;
                case "--downstairs-tls-name":
                    command = command with { Engine = (command.Engine ?? new EngineOptions()) with { DownstairsTlsNames = List(Value()) } };
                    break;
                case "--downstairs-tls-pin":
                    command = command with { Engine = (command.Engine ?? new EngineOptions()) with { DownstairsTlsPins = List(Value()) } };
                    break;
                case "--insecure":
                    insecure = true;
                    break;
                case "--degraded-write-timeout":
                    command = command with { Engine = (command.Engine ?? new EngineOptions()) with { DegradedWriteTimeout = TimeSpan.FromSeconds(ParseSeconds(Value(), arg)) } };
                    break;
                case "--qos-read-iops":
                    frontend = frontend with { QosReadIops = ParseNumber(Value(), arg) };
                    break;
                case "--qos-write-iops":
                    frontend = frontend with { QosWriteIops = ParseNumber(Value(), arg) };
                    break;
                case "--qos-total-iops":
                    frontend = frontend with { QosTotalIops = ParseNumber(Value(), arg) };
                    break;
                case "--qos-read-mbps":
                    frontend = frontend with { QosReadMbps = ParseNumber(Value(), arg) };
                    break;
                case "--qos-write-mbps":
                    frontend = frontend with { QosWriteMbps = ParseNumber(Value(), arg) };
                    break;
                case "--qos-total-mbps":
                    frontend = frontend with { QosTotalMbps = ParseNumber(Value(), arg) };
                    break;
                case "--qos-burst":
                    frontend = frontend with { QosBurst = TimeSpan.FromSeconds(ParseSeconds(Value(), arg)) };
                    break;
                case "--verbose":
                    command = command with { Verbose = true };
                    break;
                case "--log-interval":
                    frontend = frontend with { LogThrottleInterval = TimeSpan.FromSeconds(ParseSeconds(Value(), arg)) };
                    break;
                case "--log-json":
                    command = command with { LogJson = Value() };
                    break;
                case "--metrics":
                    command = command with { Metrics = ParseEndPoint(Value(), arg) };
                    break;
                default:
                    throw new ArgumentException($"unknown option '{arg}' (see --help).");
            }
        }
        if (command.ExportName.Length == 0)
        {
            throw new ArgumentException("--export: the name must not be empty (the first export is served under the empty name anyway).");
        }
        if (command.Engine is not null)
        {
            command = command with { Engine = command.Engine with { LogThrottleInterval = frontend.LogThrottleInterval, Insecure = insecure } };
        }
        frontend = frontend with { Insecure = insecure };
        try
        {
            frontend.Validate();
            command.Engine?.Validate();
        }
        catch (ArgumentException e)
        {
            // The records speak of properties; the operator set options. Longest first: Downstairs is a
            // prefix of DownstairsTlsDir.
            throw new ArgumentException(OptionNames.OrderByDescending(p => p.Key.Length).Aggregate(e.Message, (m, p) => m.Replace(p.Key, p.Value, StringComparison.Ordinal)), e);
        }
        if (command.Engine is not null && command.FilePath is not null)
        {
            throw new ArgumentException("--downstairs and --file are different backends; choose one.");
        }
        if (command.Engine?.DownstairsTlsDir is { } tlsDir)
        {
            // Loaded once here so a missing or mismatched file stops the start with one line naming it.
            try
            {
                using TlsCredentials check = TlsCredentials.LoadClient(tlsDir, requireCertificate: true);
            }
            catch (TlsSetupException e)
            {
                throw new ArgumentException($"--downstairs-tls-dir: {e.Message}", e);
            }
        }
        if (frontend.Tls != TlsMode.Off && frontend.TlsDir is { } frontendTlsDir)
        {
            try
            {
                using TlsCredentials check = TlsCredentials.LoadServer(frontendTlsDir, requireCa: frontend.TlsVerifyClient);
            }
            catch (TlsSetupException e)
            {
                throw new ArgumentException($"--tls-dir: {e.Message}", e);
            }
        }
        return command with { Frontend = frontend };
    }

    /// <summary>Validated record properties and the options (config keys) that set them.</summary>
    internal static readonly IReadOnlyDictionary<string, string> OptionNames = new Dictionary<string, string>(StringComparer.Ordinal)
    {
        ["MaxInFlightBytesPerConnection"] = "--max-inflight-bytes-per-connection",
        ["MaxInFlightBytesTotal"] = "--max-inflight-bytes",
        ["MaxInFlightRequestsPerConnection"] = "--max-requests-per-connection",
        ["MaxPayloadBytes"] = "--max-payload",
        ["MaxConnections"] = "--max-connections",
        ["MaxOutstandingJobs"] = "--max-outstanding-jobs",
        ["MaxOutstandingBytes"] = "--max-outstanding-bytes",
        ["NoProgressTimeout"] = "--no-progress-timeout",
        ["DegradedWriteTimeout"] = "--degraded-write-timeout",
        ["ScrubInterval"] = "--scrub-interval",
        ["RepairRateLimit"] = "--repair-rate-limit",
        ["RepairDutyCycle"] = "--repair-duty-cycle",
        ["RepairParallelism"] = "--repair-parallelism",
        ["ChangeRecordMaxBytes"] = "--change-record-max-bytes",
        ["ChangeRecordGranuleBytes"] = "--change-record-granule",
        ["LogThrottleInterval"] = "--log-interval",
        ["Generation"] = "--generation",
        ["MaxGenerationStep"] = "--max-generation-step",
        ["MaxFlushStep"] = "--max-flush-step",
        ["Downstairs"] = "--downstairs",
        ["Listen"] = "--listen",
        ["UnixSocketPath"] = "--unix",
        ["UnixSocketMode"] = "--unix-mode",
        ["TlsVerifyClient"] = "--tls-verify-client",
        ["TlsDir"] = "--tls-dir",
        ["Tls"] = "--tls",
        ["PayloadTimeout"] = "--payload-timeout",
        ["SendTimeout"] = "--send-timeout",
        ["DownstairsTlsDir"] = "--downstairs-tls-dir",
        ["DownstairsTlsNames"] = "--downstairs-tls-name",
        ["DownstairsTlsPins"] = "--downstairs-tls-pin",
        ["Insecure"] = "--insecure",
        ["QosReadIops"] = "--qos-read-iops",
        ["QosWriteIops"] = "--qos-write-iops",
        ["QosTotalIops"] = "--qos-total-iops",
        ["QosReadMbps"] = "--qos-read-mbps",
        ["QosWriteMbps"] = "--qos-write-mbps",
        ["QosTotalMbps"] = "--qos-total-mbps",
        ["QosBurst"] = "--qos-burst",
    };

    private static string[] List(string text) => text.Split(',', StringSplitOptions.TrimEntries | StringSplitOptions.RemoveEmptyEntries);
    /// <summary>A socket path; an ADDR:PORT (the control endpoint's old TCP form) is refused with the reason.</summary>
    internal static string ParseControlPath(string text, string setting)
    {
        if (Server.ControlServer.RefuseTcp(text, setting) is { } refusal)
        {
            throw new ArgumentException(refusal);
        }
        if (text.Length == 0)
        {
            throw new ArgumentException($"{setting}: the path must not be empty.");
        }
        return text;
    }

    private static int ParseInt(string text, string setting) =>
        int.TryParse(text, NumberStyles.None, CultureInfo.InvariantCulture, out int value) && value > 0
            ? value
            : throw new ArgumentException($"{setting}: '{text}' is not a positive integer.");

    private static double ParseSeconds(string text, string setting) =>
        double.TryParse(text, NumberStyles.AllowDecimalPoint, CultureInfo.InvariantCulture, out double value) && value > 0
            ? value
            : throw new ArgumentException($"{setting}: '{text}' is not a positive number of seconds.");

    private static double ParseNumber(string text, string setting) =>
        double.TryParse(text, NumberStyles.AllowDecimalPoint, CultureInfo.InvariantCulture, out double value) && value >= 0
            ? value
            : throw new ArgumentException($"{setting}: '{text}' is not a number (0 or more).");

    private static double ParseSecondsOrZero(string text, string setting) =>
        double.TryParse(text, NumberStyles.AllowDecimalPoint, CultureInfo.InvariantCulture, out double value) && value >= 0
            ? value
            : throw new ArgumentException($"{setting}: '{text}' is not a number of seconds (0 or more).");

    internal static IPEndPoint ParseEndPoint(string text, string setting)
    {
        if (IPEndPoint.TryParse(text, out IPEndPoint? endPoint))
        {
            if (endPoint.Port == 0 && !text.EndsWith(":0", StringComparison.Ordinal))
            {
                endPoint.Port = FrontendOptions.DefaultPort;
            }
            return endPoint;
        }
        throw new ArgumentException($"{setting}: '{text}' is not ADDRESS:PORT (example: 127.0.0.1:10809).");
    }
}
