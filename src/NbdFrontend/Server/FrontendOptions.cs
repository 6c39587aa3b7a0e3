using System.Net;
using NbdServer.Frontend.Qos;

namespace NbdServer.Frontend.Server;

/// <summary>How the frontend offers TLS (proto.md "TLS support": NOTLS, SELECTIVETLS, FORCEDTLS).</summary>
internal enum TlsMode
{
    /// <summary>No TLS: NBD_OPT_STARTTLS is answered NBD_REP_ERR_POLICY.</summary>
    Off,

    /// <summary>STARTTLS is accepted; a client may also stay in plaintext.</summary>
    On,

    /// <summary>Every option but STARTTLS and ABORT gets NBD_REP_ERR_TLS_REQD until TLS is up.</summary>
    Require,
}

/// <summary>Limits and endpoints of the NBD frontend. Every limit is a named setting with a default.</summary>
internal sealed record FrontendOptions
{
    public const int DefaultPort = 10809;

    /// <summary>Upper bound of <see cref="MaxBlockStatusExtents"/> (an 8 MiB reply).</summary>
    private const int MaxBlockStatusExtentsLimit = 1 << 20;

    /// <summary>Upper bound of the payload, send and handshake timeouts.</summary>
    private static readonly TimeSpan MaxTimeout = TimeSpan.FromDays(1);

    /// <summary>TCP endpoint; null serves only the Unix socket.</summary>
    public IPEndPoint? Listen { get; init; } = new(IPAddress.Loopback, DefaultPort);

    /// <summary>
    /// Path of an NBD Unix socket, served beside (or, with no TCP listen, instead of) the TCP port.
    /// The recommended way for a same-host kernel client: file permissions decide who may connect.
    /// </summary>
    public string? UnixSocketPath { get; init; }

    /// <summary>
    /// Permissions of the Unix socket (octal). 0600: only the service user (and root, which the kernel
    /// client runs as) may connect — whoever can connect can read and write the whole disk. Use 0660
    /// and a group to admit a qemu running as another user.
    /// </summary>
    public string UnixSocketMode { get; init; } = "0600";

    /// <summary>off, on (STARTTLS offered) or require (nothing but STARTTLS/ABORT before TLS).</summary>
    public TlsMode Tls { get; init; } = TlsMode.Off;

    /// <summary>Directory with server-cert.pem and server-key.pem (and ca-cert.pem for client verification).</summary>
    public string? TlsDir { get; init; }

    /// <summary>Require a client certificate that chains to ca-cert.pem in <see cref="TlsDir"/>.</summary>
    public bool TlsVerifyClient { get; init; }

    /// <summary>Allow a plaintext TCP listen on a non-loopback address (refused at start otherwise).</summary>
    public bool Insecure { get; init; }

    /// <summary>
    /// A WRITE's payload must arrive within this long of its header. The write holds its byte budget
    /// meanwhile, so a client that stops half-way would otherwise starve every other connection.
    /// </summary>
    public TimeSpan PayloadTimeout { get; init; } = TimeSpan.FromSeconds(60);

    /// <summary>
    /// A batch of replies must be taken by the client within this long. Replies hold their bytes until
    /// sent, so a client that never reads would otherwise keep its budget forever.
    /// </summary>
    public TimeSpan SendTimeout { get; init; } = TimeSpan.FromSeconds(30);

    /// <summary>Largest READ or WRITE accepted (the kernel sends up to 32 MiB).</summary>
    public int MaxPayloadBytes { get; init; } = 32 * 1024 * 1024;

    /// <summary>
    /// Bytes of request and reply payload one connection may hold. At the cap the server stops
    /// reading that socket until replies drain. Must be at least <see cref="MaxPayloadBytes"/>.
    /// </summary>
    public long MaxInFlightBytesPerConnection { get; init; } = 64L * 1024 * 1024;

    /// <summary>Bytes of payload all connections together may hold.</summary>
    public long MaxInFlightBytesTotal { get; init; } = 512L * 1024 * 1024;

    /// <summary>Requests one connection may have in flight (the kernel keeps up to 128).</summary>
    public int MaxInFlightRequestsPerConnection { get; init; } = 256;

    /// <summary>Option data larger than this is discarded and answered with ERR_TOO_BIG.</summary>
    public int MaxOptionBytes { get; init; } = 64 * 1024;

    /// <summary>Options one connection may send before it must choose an export (a hostile client can't loop forever).</summary>
    public int MaxOptionsPerHandshake { get; init; } = 1024;

    /// <summary>A client that has not finished the handshake after this long is disconnected.</summary>
    public TimeSpan HandshakeTimeout { get; init; } = TimeSpan.FromSeconds(30);

    /// <summary>Concurrent clients, on TCP and on the Unix socket each: strangers on a TCP port can never fill the slots the local kernel client reconnects through.</summary>
    public int MaxConnections { get; init; } = 256;

    /// <summary>Descriptors in one BLOCK_STATUS reply.</summary>
    public int MaxBlockStatusExtents { get; init; } = 1024;

    /// <summary>How long shutdown waits for clients to drain and disconnect before closing them.</summary>
    public TimeSpan ShutdownTimeout { get; init; } = TimeSpan.FromSeconds(10);

    /// <summary>
    /// At a reload, how long a client still in the handshake may take to finish it and be handed over
    /// with the others (a real client needs milliseconds); after that it is closed and must connect
    /// again. Bounds how long a stranger that never finishes can hold a reload.
    /// </summary>
    public TimeSpan HandoverHandshakeGrace { get; init; } = TimeSpan.FromSeconds(2);

    /// <summary>
    /// At a reload, how long every connection together may take to stop between two requests (a
    /// client stalled half-way through a write's payload holds its connection there); connections
    /// not stopped by then are closed, so one stalled client cannot hold the others' pause.
    /// </summary>
    public TimeSpan HandoverTimeout { get; init; } = TimeSpan.FromSeconds(5);

    /// <summary>
    /// At a reload, how long the trial start of the new image (its executable and settings as they
    /// are on disk, checked before any client is stopped) may take; slower is a refused reload.
    /// </summary>
    public TimeSpan ReloadCheckTimeout { get; init; } = TimeSpan.FromSeconds(30);

    /// <summary>Repeated request failures are summarised once per this interval (a storm is a few lines with counts).</summary>
    public TimeSpan LogThrottleInterval { get; init; } = TimeSpan.FromSeconds(5);

    /// <summary>
    /// QoS: the export's read operations per second (0: no limit). Requests over a limit wait (the
    /// client is read no faster), they never fail. Changed live by <c>nbd-server qos set</c>.
    /// </summary>
    public double QosReadIops { get; init; }

    /// <summary>QoS: write operations per second (WRITE, TRIM, WRITE_ZEROES; 0: no limit).</summary>
    public double QosWriteIops { get; init; }

    /// <summary>QoS: read and write operations together per second (0: no limit).</summary>
    public double QosTotalIops { get; init; }

    /// <summary>QoS: MiB/s read (0: no limit).</summary>
    public double QosReadMbps { get; init; }

    /// <summary>QoS: MiB/s written (WRITE payload; WRITE_ZEROES where the volume writes the zeroes; 0: no limit).</summary>
    public double QosWriteMbps { get; init; }

    /// <summary>QoS: MiB/s read and written together (0: no limit).</summary>
    public double QosTotalMbps { get; init; }

    /// <summary>QoS: each limit's bucket holds this many seconds of it, what an idle client may spend at once.</summary>
    public TimeSpan QosBurst { get; init; } = QosLimits.DefaultBurst;

    /// <summary>The QoS settings as the limits every export starts with.</summary>
    public QosLimits ToQosLimits() => new()
    {
        ReadIops = QosReadIops,
        WriteIops = QosWriteIops,
        TotalIops = QosTotalIops,
        ReadMbps = QosReadMbps,
        WriteMbps = QosWriteMbps,
        TotalMbps = QosTotalMbps,
        Burst = QosBurst,
    };

    public void Validate()
    {
        if (ToQosLimits().Validate(QosPropertyName) is { } qos)
        {
            throw new ArgumentException(qos + ".");
        }
        if (MaxPayloadBytes < 4096)
        {
            throw new ArgumentException($"{nameof(MaxPayloadBytes)} must be at least 4096 (got {MaxPayloadBytes}).");
        }
        if (MaxInFlightBytesPerConnection < MaxPayloadBytes)
        {
            throw new ArgumentException($"{nameof(MaxInFlightBytesPerConnection)} ({MaxInFlightBytesPerConnection}) must be at least {nameof(MaxPayloadBytes)} ({MaxPayloadBytes}).");
        }
        if (MaxInFlightBytesTotal < MaxInFlightBytesPerConnection)
        {
            throw new ArgumentException($"{nameof(MaxInFlightBytesTotal)} ({MaxInFlightBytesTotal}) must be at least {nameof(MaxInFlightBytesPerConnection)} ({MaxInFlightBytesPerConnection}).");
        }
        if (MaxInFlightRequestsPerConnection < 1 || MaxConnections < 1 || MaxOptionsPerHandshake < 1 || MaxBlockStatusExtents < 1)
        {
            throw new ArgumentException("Request, connection, option and extent limits must be at least 1.");
        }
        if (LogThrottleInterval <= TimeSpan.Zero || PayloadTimeout <= TimeSpan.Zero || SendTimeout <= TimeSpan.Zero || HandshakeTimeout <= TimeSpan.Zero)
        {
            throw new ArgumentException($"{nameof(LogThrottleInterval)}, {nameof(PayloadTimeout)}, {nameof(SendTimeout)} and {nameof(HandshakeTimeout)} must be positive.");
        }
        if (PayloadTimeout > MaxTimeout || SendTimeout > MaxTimeout || HandshakeTimeout > MaxTimeout)
        {
            // Timers take at most ~49 days; a longer deadline would fail every request at run time.
            throw new ArgumentException($"{nameof(PayloadTimeout)}, {nameof(SendTimeout)} and {nameof(HandshakeTimeout)} may be at most {MaxTimeout.TotalHours:0} hours.");
        }
        if (MaxBlockStatusExtents > MaxBlockStatusExtentsLimit || MaxOptionBytes < 0)
        {
            // A BLOCK_STATUS reply is 4 + 8 bytes per extent, built in one buffer and charged to the budget.
            throw new ArgumentException($"{nameof(MaxBlockStatusExtents)} may be at most {MaxBlockStatusExtentsLimit}, and {nameof(MaxOptionBytes)} may not be negative.");
        }
        if (Listen is null && UnixSocketPath is null)
        {
            throw new ArgumentException($"Nothing to listen on: set {nameof(Listen)} or {nameof(UnixSocketPath)}.");
        }
        _ = UnixSocketFileMode();
        if (Tls != TlsMode.Off && TlsDir is null)
        {
            throw new ArgumentException($"{nameof(Tls)} {Tls.ToString().ToLowerInvariant()} needs {nameof(TlsDir)} (server-cert.pem, server-key.pem; make them with nbd-certs).");
        }
        if (TlsVerifyClient && Tls == TlsMode.Off)
        {
            throw new ArgumentException($"{nameof(TlsVerifyClient)} needs {nameof(Tls)} on or require.");
        }
        // Off loopback the disk is reachable by every host on the network: the client must both encrypt
        // (require, not on: with "on" a client that skips STARTTLS gets plaintext) and prove who it is
        // (a certificate from our CA), else anyone who can reach the port reads and writes the disk.
        if (Listen is { } endPoint && !IPAddress.IsLoopback(endPoint.Address) && !Insecure && (Tls != TlsMode.Require || !TlsVerifyClient))
        {
            throw new ArgumentException(
                $"{nameof(Listen)} {endPoint} is not a loopback address and clients are not required to authenticate " +
                $"({nameof(Tls)} is {Tls.ToString().ToLowerInvariant()}{(TlsVerifyClient ? "" : $", {nameof(TlsVerifyClient)} is off")}): anyone on the network could read and write the disk. " +
                $"Set {nameof(Tls)} require with {nameof(TlsDir)} and {nameof(TlsVerifyClient)} (certificates: nbd-certs), use {nameof(UnixSocketPath)} for a local client, or set {nameof(Insecure)} to allow it anyway.");
        }
    }

    /// <summary>"read-iops" → "QosReadIops": validation speaks of the record's properties.</summary>
    private static string QosPropertyName(string key) =>
        "Qos" + string.Concat(key.Split('-').Select(w => w == "iops" ? "Iops" : w == "mbps" ? "Mbps" : char.ToUpperInvariant(w[0]) + w[1..]));

    /// <summary>The Unix socket's permissions, parsed from <see cref="UnixSocketMode"/>.</summary>
    public UnixFileMode UnixSocketFileMode()
    {
        if (UnixSocketMode.Length is < 1 or > 4 || !UnixSocketMode.All(c => c is >= '0' and <= '7'))
        {
            throw new ArgumentException($"{nameof(UnixSocketMode)} '{UnixSocketMode}' is not an octal file mode such as 0600.");
        }
        int mode = Convert.ToInt32(UnixSocketMode, 8);
        if ((mode & ~0x1ff) != 0)
        {
            throw new ArgumentException($"{nameof(UnixSocketMode)} '{UnixSocketMode}' may only set permission bits (at most 0777).");
        }
        return (UnixFileMode)mode;
    }
}
