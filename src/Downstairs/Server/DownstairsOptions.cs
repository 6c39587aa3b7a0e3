using System.Net;
using NbdServer.Protocol;

namespace NbdServer.Downstairs.Server;

/// <summary>
/// Every limit of a running downstairs, with its default. Each is settable on the command line
/// (see <c>nbd-downstairs run --help</c>); the defaults are sized so that one stalled engine
/// connection pins at most ~100 MiB (jobs + bytes + one frame in the receive buffer).
/// </summary>
internal sealed record DownstairsOptions
{
    public required string DataDir { get; init; }

    public IPEndPoint Listen { get; init; } = new(IPAddress.Loopback, 3810);

    /// <summary>
    /// Dedicated threads doing blocking pread/pwrite/fsync. Writes queue behind slow IO, never behind
    /// the network. Two, not more: writes land in the page cache in microseconds, and each idle IO
    /// thread spins before it sleeps; with three downstairs on two CPUs, four threads each cost the
    /// volume a sixth of its 4k IOPS. Flush fsyncs run on their own pool.
    /// </summary>
    public int IoThreads { get; init; } = 2;

    /// <summary>Jobs a connection may have admitted but not yet answered; past it we stop reading its socket.</summary>
    public int MaxJobsPerConnection { get; init; } = 1024;

    /// <summary>Payload bytes (requests + replies) a connection may hold in memory; 64 MiB ≈ Crucible's 50 MiB fault limit.</summary>
    public long MaxBytesPerConnection { get; init; } = 64L << 20;

    /// <summary>Largest frame body accepted or sent (a 32 MiB NBD write plus its hashes).</summary>
    public int MaxFrameBytes { get; init; } = Wire.DefaultMaxFrameBytes;

    /// <summary>
    /// Negotiated connections other than the current writer (readers, probes, fenced writers), and
    /// separately connections still before Hello. The writer has a slot of its own: a read-write Hello
    /// that passes fencing is always admitted, so idle strangers cannot lock the upstairs out. When
    /// the pre-Hello slots are full a new connection evicts the oldest one still silent.
    /// </summary>
    public int MaxConnections { get; init; } = 16;

    /// <summary>A peer that has not said Hello by then is dropped (it holds a connection slot).</summary>
    public TimeSpan HelloTimeout { get; init; } = TimeSpan.FromSeconds(10);

    /// <summary>
    /// TLS directory (ca-cert.pem, server-cert.pem, server-key.pem): every connection must complete a
    /// mutual TLS handshake with a client certificate issued by ca-cert.pem before a byte of its Hello
    /// is read. Null: plaintext, allowed only on a loopback address or with <see cref="Insecure"/>.
    /// </summary>
    public string? TlsDir { get; init; }

    /// <summary>The upstairs identity <c>nbd-certs client --name upstairs</c> makes, as the README does.</summary>
    public const string DefaultAllowedClient = "upstairs";

    /// <summary>
    /// Client certificate names (common name or DNS alternative name) allowed to connect; empty (set
    /// as <c>*</c>): any client certificate issued by the CA. Defaults to the upstairs alone, not to
    /// "any": the same CA often issues certificates to NBD clients too, and one of those must not be
    /// able to fence the upstairs or rewrite a region. Also lets one CA serve several volumes whose
    /// upstairs must not reach each other's replicas.
    /// </summary>
    public IReadOnlyList<string> TlsAllowClients { get; init; } = [DefaultAllowedClient];

    /// <summary>
    /// A peer that has not completed the TLS handshake by then is dropped. Like the Hello timeout, it
    /// bounds how long a silent stranger holds a connection slot; 10 s covers a handshake over a slow
    /// WAN link many times over.
    /// </summary>
    public TimeSpan TlsHandshakeTimeout { get; init; } = TimeSpan.FromSeconds(10);

    /// <summary>
    /// Serve plaintext on a non-loopback address. Off: such a configuration refuses to start, because
    /// anyone who can reach the port could read and overwrite the region.
    /// </summary>
    public bool Insecure { get; init; }
    /// A negotiated connection that sends nothing for this long is closed (it holds a slot). The
    /// engine pings an idle link every 5 s (DownstairsClientOptions.PingInterval), so only a dead or
    /// hostile peer stays silent this long.
    /// </summary>
    public TimeSpan IdleTimeout { get; init; } = TimeSpan.FromSeconds(30);

    /// <summary>
    /// Once a frame has begun to arrive, all of it must arrive within this time. A 33 MiB frame at
    /// 10 Mbit/s takes 28 s; a peer that trickles a body to hold its buffer is cut off.
    /// </summary>
    public TimeSpan FrameTimeout { get; init; } = TimeSpan.FromSeconds(30);

    /// <summary>
    /// A reply batch the peer has not taken off the socket within this time closes the connection.
    /// A peer that stops reading would otherwise hold its slot and up to --max-bytes of replies for
    /// ever (its reader waits on the budget, not on the socket, so the idle timeout never fires).
    /// </summary>
    public TimeSpan SendTimeout { get; init; } = TimeSpan.FromSeconds(30);

    /// <summary>
    /// Frame bodies being received plus payloads in flight, over all connections together. The
    /// writer's share (--max-bytes + --max-frame) is reserved for it; the rest is shared by the
    /// others. A connection that would go past it waits (its socket is not read): memory stays flat
    /// however many peers send large frames.
    /// </summary>
    public long MaxMemoryBytes { get; init; } = 512L << 20;

    /// <summary>Memory of <see cref="MaxMemoryBytes"/> only the current writer may use.</summary>
    internal long WriterMemoryReserve => MaxBytesPerConnection + MaxFrameBytes;

    /// <summary>
    /// How far one read-write Hello may raise the region's highest generation. The highest generation
    /// is durable and the upstairs starts at highest + 1, so a peer that could record 2^64 − 1 would
    /// brick the volume with one packet; an honest upstairs raises it by one per activation (or to an
    /// explicit --generation). A million keeps ~9·10^12 activations of headroom below the cap and
    /// still lets an operator jump ahead; raise it for a larger deliberate jump.
    /// </summary>
    public ulong MaxGenerationStep { get; init; } = Wire.DefaultMaxGenerationStep;

    /// <summary>
    /// How far a Flush or repair commit may put a flush number above the highest this region has
    /// recorded. The upstairs continues from the highest flush number any replica reports, so a peer
    /// that could record 2^63 − 1 would make every later flush refused (the volume bricked); an
    /// honest upstairs is ahead of a replica only by the flushes it missed. 2^40: see
    /// <see cref="Wire.DefaultMaxFlushStep"/>.
    /// </summary>
    public ulong MaxFlushStep { get; init; } = Wire.DefaultMaxFlushStep;

    /// <summary>Repeated errors are summarised once per this interval (DESIGN §4).</summary>
    public TimeSpan LogSummaryInterval { get; init; } = TimeSpan.FromSeconds(5);

    /// <summary>Socket receive buffer handed to the frame reader per read.</summary>
    public int ReceiveBufferBytes { get; init; } = 64 << 10;

    /// <summary>
    /// Keep an extent written since the last flush marked dirty across the flush, cleared by the next
    /// flush that finds it idle. Saves the metadata fdatasync before the first write after each flush
    /// (4k random writes, flush per 64: several per flush); costs more repair after a crash.
    /// </summary>
    public bool StickyDirty { get; init; }

    public void Validate()
    {
        Check(IoThreads is >= 1 and <= 256, "--io-threads must be 1 to 256");
        Check(MaxJobsPerConnection is >= 1 and <= Wire.MaxJobsLimit, $"--max-jobs must be 1 to {Wire.MaxJobsLimit}");
        Check(MaxFrameBytes is >= Wire.MinMaxFrameBytes and <= Wire.MaxMaxFrameBytes, $"--max-frame must be {Wire.MinMaxFrameBytes} bytes to 1 GiB");
        Check(MaxBytesPerConnection >= MaxFrameBytes, "--max-bytes must be at least --max-frame");
        Check(MaxConnections >= 1, "--max-connections must be at least 1");
        Check(HelloTimeout > TimeSpan.Zero, "--hello-timeout must be positive");
        Check(IdleTimeout > TimeSpan.Zero, "--idle-timeout must be positive");
        Check(FrameTimeout > TimeSpan.Zero, "--frame-timeout must be positive");
        Check(SendTimeout > TimeSpan.Zero, "--send-timeout must be positive");
        Check(MaxMemoryBytes >= 2 * WriterMemoryReserve, $"--max-memory must be at least twice (--max-bytes + --max-frame) = {2 * WriterMemoryReserve} bytes (half is the writer's reserve)");
        Check(MaxGenerationStep is >= 1 and <= Wire.MaxGeneration, $"--max-generation-step must be 1 to {Wire.MaxGeneration}");
        Check(MaxFlushStep is >= 1 and < Wire.MaxFlushNumber, $"--max-flush-step must be 1 to {Wire.MaxFlushNumber - 1}");
        Check(LogSummaryInterval > TimeSpan.Zero, "--log-interval must be positive");
        Check(ReceiveBufferBytes is >= 4096 and <= 16 << 20, "--receive-buffer must be 4 KiB to 16 MiB");
        Check(TlsHandshakeTimeout > TimeSpan.Zero, "--tls-handshake-timeout must be positive");
        Check(TlsDir is not null || TlsAllowClients is [DefaultAllowedClient], "--tls-allow-client needs --tls-dir");
        Check(TlsDir is not null || Insecure || IPAddress.IsLoopback(Listen.Address),
            $"--listen {Listen} is not a loopback address and --tls-dir is not set: anyone who can reach it could read and overwrite the region. " +
            "Set --tls-dir (certificates: nbd-certs), or --insecure to serve plaintext anyway");
    }

    private static void Check(bool ok, string message)
    {
        if (!ok)
        {
            throw new ArgumentException(message);
        }
    }
}
