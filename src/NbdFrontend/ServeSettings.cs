using System.CommandLine;
using NbdServer.Common.Cli;

namespace NbdServer.Frontend;

/// <summary>
/// The settings of <c>nbd-server</c> when it serves: each an option of the command line, a key of the
/// config file (the name without dashes) and an <c>NBD_SERVER_</c> variable. The descriptions are the
/// help text, the man page and the meaning column of docs/configuration.md.
/// </summary>
internal static class ServeSettings
{
    public static readonly Option<string[]> Downstairs = Settings.Value("--downstairs", "A:P,B:P,C:P",
        "the replicated volume: three nbd-downstairs servers; writes are acknowledged once two replicas have them (see README)");
    public static readonly Option<string[]> Memory = Settings.Value("--memory", "SIZE", "a sparse in-memory volume (default, 1GiB)");
    public static readonly Option<string[]> File = Settings.Value("--file", "PATH", "a file or block device; created sparse when --size is given");
    public static readonly Option<string[]> Size = Settings.Value("--size", "SIZE", "size of a file to create (an existing file must match)");

    public static readonly Option<string[]> Generation = Settings.Value("--generation", "N",
        "activation generation (default: one above the highest any replica has seen; two upstairs must never share one)");
    public static readonly Option<string[]> Control = Settings.Value("--control", "PATH",
        "the control socket (status, scrub, repair pace, QoS), mode 0600 (default $RUNTIME_DIRECTORY/control.sock under systemd, else /run/nbd-server/control.sock if writable, else $XDG_RUNTIME_DIR/nbd-server/control.sock; see `nbd-server status`). A --file or --memory server opens one (for QoS) only when given");
    public static readonly Option<string[]> MaxGenerationStep = Settings.Value("--max-generation-step", "N",
        "a replica whose highest generation is more than this above every other's is left out of activation (default 1000000; keep it equal to the downstairs' --max-generation-step)");
    public static readonly Option<string[]> MaxFlushStep = Settings.Value("--max-flush-step", "N",
        "a replica whose highest flush number is more than this above every other's is left out of activation (default 2^40; keep it equal to the downstairs' --max-flush-step)");
    public static readonly Option<string[]> MaxOutstandingJobs = Settings.Value("--max-outstanding-jobs", "N",
        "jobs one replica may owe before it is faulted (default 900)");
    public static readonly Option<string[]> MaxOutstandingBytes = Settings.Value("--max-outstanding-bytes", "SIZE",
        "bytes one replica may owe before it is faulted (default 64MiB)");
    public static readonly Option<string[]> NoProgressTimeout = Settings.Value("--no-progress-timeout", "SECONDS",
        "a replica that completes nothing this long is faulted (default 5)");
    public static readonly Option<string[]> DegradedWriteTimeout = Settings.Value("--degraded-write-timeout", "SECONDS",
        "with one replica left, writes wait this long then fail EIO (default 3)");
    public static readonly Option<string[]> ScrubInterval = Settings.Value("--scrub-interval", "SECONDS",
        "check every block of every replica this often, rewriting bad copies (default 604800 = 7 days; 0 = only `nbd-server scrub`)");
    public static readonly Option<string[]> RepairRateLimit = Settings.Value("--repair-rate-limit", "MIB",
        "most MiB/s one replica's repair copies (default 0 = no limit)");
    public static readonly Option<string[]> RepairDutyCycle = Settings.Value("--repair-duty-cycle", "D",
        "share of the time a repair keeps busy while the guest does IO, 0 < D <= 1 (default 0.5; flat out while the guest is idle)");
    public static readonly Option<string[]> RepairParallelism = Settings.Value("--repair-parallelism", "N",
        "extents one repair copies at a time (default 4)");
    public static readonly Option<string[]> StopRepairGrace = Settings.Value("--stop-repair-grace", "SECONDS",
        "at a stop, how long a live repair in progress may go on to finish; past it the replica is left behind and the next start reconciles it (default 5; 0 = stop at once). A stop takes up to 25 s more than this: keep systemd's TimeoutStopSec (60 in the unit) above that");
    public static readonly Option<string[]> ChangeRecordMaxBytes = Settings.Value("--change-record-max-bytes", "SIZE",
        "most a changed-block record may mark for a replica out of service; past it the record is dropped and the replica's repair compares extents (default 16GiB; 0 = no record)");
    public static readonly Option<string[]> ChangeRecordGranule = Settings.Value("--change-record-granule", "SIZE",
        "granule of that record (default 4KiB)");
    public static readonly Option<string[]> DownstairsTlsDir = Settings.Value("--downstairs-tls-dir", "DIR",
        "mutual TLS to the downstairs: DIR holds ca-cert.pem, client-cert.pem and client-key.pem (make them with nbd-certs); each downstairs must present a certificate from that CA. Default: plaintext, refused unless every downstairs is on 127.0.0.0/8 or ::1");
    public static readonly Option<string[]> DownstairsTlsName = Settings.Value("--downstairs-tls-name", "NAME,...",
        "the name each downstairs' certificate must carry: one for all or one per downstairs (default: each address given to the downstairs option, then an IP name in its certificate)");
    public static readonly Option<string[]> DownstairsTlsPin = Settings.Value("--downstairs-tls-pin", "SHA256,...",
        "accept a downstairs only with this certificate fingerprint, one for all or one per downstairs (`nbd-certs show` prints it); replaces the name check");
    public static readonly Option<bool> Insecure = Settings.Flag("--insecure",
        "allow plaintext links to downstairs on other hosts, and an NBD listen on a non-loopback address without --tls require and --tls-verify-client");

    public static readonly Option<string[]> Listen = Settings.Value("--listen", "ADDR:PORT",
        "where to listen (default 127.0.0.1:10809; `none`: only the Unix socket). A non-loopback address needs --tls require and --tls-verify-client (or --insecure)");
    public static readonly Option<string[]> Unix = Settings.Value("--unix", "PATH",
        "also serve NBD on a Unix socket (the way for a client on this host: nbd-client -unix PATH /dev/nbd0, nbd+unix:///vol0?socket=PATH); a stale socket file is replaced, the file is removed at exit");
    public static readonly Option<string[]> UnixMode = Settings.Value("--unix-mode", "MODE",
        "permissions of the Unix socket, octal (default 0600: the service user and root; 0660 admits the socket's group)");
    public static readonly Option<string[]> Tls = Settings.Value("--tls", "MODE",
        "off, on (clients may use STARTTLS) or require (every option but STARTTLS is refused with ERR_TLS_REQD until TLS is up) (default off)",
        "off", "on", "require");
    public static readonly Option<string[]> TlsDir = Settings.Value("--tls-dir", "DIR",
        "server-cert.pem and server-key.pem, and ca-cert.pem to verify client certificates with; make them with nbd-certs");
    public static readonly Option<bool> TlsVerifyClient = Settings.Flag("--tls-verify-client",
        "require a client certificate that chains to DIR/ca-cert.pem");
    public static readonly Option<string[]> PayloadTimeout = Settings.Value("--payload-timeout", "SECONDS",
        "a WRITE's payload must arrive within this long of its header, else the connection is closed and its budget returned (default 60)");
    public static readonly Option<string[]> SendTimeout = Settings.Value("--send-timeout", "SECONDS",
        "replies not taken by the client within this long close the connection and return its budget (default 30)");
    public static readonly Option<string[]> Export = Settings.Value("--export", "NAME", "export name (default vol0)");
    public static readonly Option<string[]> Description = Settings.Value("--description", "TEXT", "description shown by `nbdinfo --list`");
    public static readonly Option<bool> ReadOnly = Settings.Flag("--read-only", "refuse writes (EPERM), advertise READ_ONLY");
    public static readonly Option<string[]> MaxPayload = Settings.Value("--max-payload", "SIZE", "largest READ/WRITE accepted (default 32MiB)");
    public static readonly Option<string[]> MaxInFlightBytesPerConnection = Settings.Value("--max-inflight-bytes-per-connection", "SIZE",
        "payload bytes one connection may hold (default 64MiB)");
    public static readonly Option<string[]> MaxInFlightBytes = Settings.Value("--max-inflight-bytes", "SIZE",
        "payload bytes all connections may hold (default 512MiB)");
    public static readonly Option<string[]> MaxRequestsPerConnection = Settings.Value("--max-requests-per-connection", "N",
        "requests in flight per connection (default 256)");
    public static readonly Option<string[]> MaxConnections = Settings.Value("--max-connections", "N",
        "concurrent clients, counted separately on TCP and on the Unix socket (default 256 each)");
    public static readonly Option<bool> Verbose = Settings.Flag("--verbose", "log every connection and option at debug level");
    public static readonly Option<string[]> LogInterval = Settings.Value("--log-interval", "SECONDS",
        "repeated errors are summarised once per interval (default 5)");
    public static readonly Option<string[]> LogJson = Settings.Value("--log-json", "FILE",
        "also write every log event as one JSON object per line to FILE");
    public static readonly Option<string[]> Metrics = Settings.Value("--metrics", "ADDR:PORT",
        "serve Prometheus metrics on http://ADDR:PORT/metrics (off by default; use 127.0.0.1): meters NbdServer.Frontend, NbdServer.ReplicaEngine, System.Runtime");
    public static readonly Option<string[]> HttpMaxConnections = Settings.Value("--http-max-connections", "N",
        "connections the control socket and the metrics endpoint each serve at once; more are closed at accept (default 8)");
    public static readonly Option<string[]> HttpTimeout = Settings.Value("--http-timeout", "SECONDS",
        "time a control or metrics client has to send a request's headers or may stay idle; a client that stops reading the answer is dropped (default 5)");

    public static readonly Option<string[]> QosReadIops = Settings.Value("--qos-read-iops", "N", "read operations per second");
    public static readonly Option<string[]> QosWriteIops = Settings.Value("--qos-write-iops", "N", "write operations per second (WRITE, TRIM, WRITE_ZEROES)");
    public static readonly Option<string[]> QosTotalIops = Settings.Value("--qos-total-iops", "N", "read and write operations together per second");
    public static readonly Option<string[]> QosReadMbps = Settings.Value("--qos-read-mbps", "MIB", "MiB/s read");
    public static readonly Option<string[]> QosWriteMbps = Settings.Value("--qos-write-mbps", "MIB",
        "MiB/s written (WRITE_ZEROES counts its length where the volume writes the zeroes: a replicated volume)");
    public static readonly Option<string[]> QosTotalMbps = Settings.Value("--qos-total-mbps", "MIB", "MiB/s read and written together");
    public static readonly Option<string[]> QosBurst = Settings.Value("--qos-burst", "SECONDS",
        "each limit's bucket holds this many seconds of it: what an idle client may spend at once (default 1)");

    /// <summary>Not a setting: where the settings are.</summary>
    public static readonly Option<string[]> Config = Settings.Value("--config", "FILE",
        "read settings from FILE (default /etc/nbd-server/nbd-server.json if it exists; or $NBD_SERVER_CONFIG)");

    public static readonly IReadOnlyList<Option> Backend = [Downstairs, Memory, File, Size];

    public static readonly IReadOnlyList<Option> Replication =
    [
        Generation, Control, MaxGenerationStep, MaxFlushStep, MaxOutstandingJobs, MaxOutstandingBytes, NoProgressTimeout,
        DegradedWriteTimeout, ScrubInterval, RepairRateLimit, RepairDutyCycle, RepairParallelism, StopRepairGrace, ChangeRecordMaxBytes,
        ChangeRecordGranule, DownstairsTlsDir, DownstairsTlsName, DownstairsTlsPin, Insecure,
    ];

    public static readonly IReadOnlyList<Option> Service =
    [
        Listen, Unix, UnixMode, Tls, TlsDir, TlsVerifyClient, PayloadTimeout, SendTimeout, Export, Description, ReadOnly,
        MaxPayload, MaxInFlightBytesPerConnection, MaxInFlightBytes, MaxRequestsPerConnection, MaxConnections, Verbose,
        LogInterval, LogJson, Metrics, HttpMaxConnections, HttpTimeout,
    ];

    /// <summary>Per export, shared by all its connections; 0 = no limit.</summary>
    public static readonly IReadOnlyList<Option> Qos = [QosReadIops, QosWriteIops, QosTotalIops, QosReadMbps, QosWriteMbps, QosTotalMbps, QosBurst];

    /// <summary>Every setting (the keys a config file or the environment may set).</summary>
    public static readonly IReadOnlyList<Option> All = [.. Backend, .. Replication, .. Qos, .. Service];
}
