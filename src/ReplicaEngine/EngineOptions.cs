using System.Net;
using NbdServer.Common.Tls;
using NbdServer.Protocol;

namespace NbdServer.ReplicaEngine;

/// <summary>
/// Settings of the upstairs. Every limit that decides when a replica is given up on is here, named,
/// with the default and the reason for it.
/// </summary>
public sealed record EngineOptions
{
    /// <summary>The three downstairs, in a fixed order (replica 0, 1, 2).</summary>
    public IReadOnlyList<IPEndPoint> Downstairs { get; init; } = [];

    /// <summary>
    /// TLS directory for the links to the downstairs (ca-cert.pem, client-cert.pem, client-key.pem):
    /// each link presents the client certificate and accepts only a downstairs whose certificate was
    /// issued by ca-cert.pem for the expected name (or matches a pin). Probes, IO and repair all use
    /// these links. Null: plaintext, allowed only to loopback addresses or with <see cref="Insecure"/>.
    /// </summary>
    public string? DownstairsTlsDir { get; init; }

    /// <summary>
    /// The names the downstairs' certificates must carry: one for all, or one per downstairs in order.
    /// Empty: each downstairs' address as written in <see cref="Downstairs"/> (then an IP alternative name).
    /// </summary>
    public IReadOnlyList<string> DownstairsTlsNames { get; init; } = [];

    /// <summary>
    /// SHA-256 fingerprints of the downstairs' certificates, one per downstairs in order (or one for
    /// all): when set, a pin replaces the name check (the certificate must still chain to the CA).
    /// </summary>
    public IReadOnlyList<string> DownstairsTlsPins { get; init; } = [];

    /// <summary>
    /// Allow plaintext links to downstairs that are not on this host. Off: such a configuration
    /// refuses to start, because anyone on the path could read the volume and forge replies.
    /// </summary>
    public bool Insecure { get; init; }

    /// <summary>Activation generation; null = one above the highest any replica has seen.</summary>
    public ulong? Generation { get; init; }

    /// <summary>
    /// How far one replica's highest generation may lie above every other replica's before it is left
    /// out of activation as misbehaving: the downstairs refuses a Hello that raises its generation by
    /// more than its --max-generation-step, so following such a replica would get the activation refused
    /// by the honest ones on every start. Same default as the downstairs' step.
    /// </summary>
    public ulong MaxGenerationStep { get; init; } = Wire.DefaultMaxGenerationStep;

    /// <summary>
    /// How far one replica's highest flush number may lie above every other replica's before it is
    /// left out of activation as misbehaving: the engine continues from the highest flush number it
    /// adopts, and a planted 2^63 − 1 would make every later flush refused. An honest replica is ahead
    /// only by flushes the others missed. Same default as the downstairs' --max-flush-step.
    /// </summary>
    public ulong MaxFlushStep { get; init; } = Wire.DefaultMaxFlushStep;

    /// <summary>
    /// Jobs one replica may have outstanding before it is faulted (while two others are in service).
    /// Crucible faults at 1000 jobs; ours is lower than the downstairs client's 1024-slot window so
    /// that submitting to a stuck replica never blocks the guest.
    /// </summary>
    public int MaxOutstandingJobs { get; init; } = 900;

    /// <summary>Bytes one replica may have outstanding before it is faulted (Crucible: 50 MiB).</summary>
    public long MaxOutstandingBytes { get; init; } = 64L * 1024 * 1024;

    /// <summary>A replica with work outstanding that completes nothing for this long is faulted.</summary>
    public TimeSpan NoProgressTimeout { get; init; } = TimeSpan.FromSeconds(5);

    /// <summary>With fewer than two replicas in service a write waits this long for one to return, then fails with EIO.</summary>
    public TimeSpan DegradedWriteTimeout { get; init; } = TimeSpan.FromSeconds(3);

    /// <summary>
    /// A read not answered this long is sent to another replica (the first may be stalled; the
    /// watchdog decides whether to fault it). Keeps a stuck replica from stalling guest reads.
    /// </summary>
    public TimeSpan ReadAttemptTimeout { get; init; } = TimeSpan.FromSeconds(1);

    /// <summary>How long startup waits for all three replicas before starting on two.</summary>
    public TimeSpan StartupWaitForAll { get; init; } = TimeSpan.FromSeconds(5);

    /// <summary>How long startup waits for at least two replicas before giving up.</summary>
    public TimeSpan StartupTimeout { get; init; } = TimeSpan.FromSeconds(60);

    /// <summary>Reconnect backoff: first delay, doubled up to the maximum.</summary>
    public TimeSpan ReconnectInitialDelay { get; init; } = TimeSpan.FromMilliseconds(100);

    public TimeSpan ReconnectMaxDelay { get; init; } = TimeSpan.FromSeconds(2);

    /// <summary>
    /// Backpressure: when the second-least-loaded replica in service is above this fraction of its
    /// budget, admission is delayed along a quadratic curve up to <see cref="MaxAdmissionDelay"/>.
    /// </summary>
    public double BackpressureStart { get; init; } = 0.5;

    public TimeSpan MaxAdmissionDelay { get; init; } = TimeSpan.FromMilliseconds(20);

    /// <summary>
    /// Gentler backpressure from the most loaded replica taking writes, above this fraction of its
    /// budget (same curve and maximum). A replica that is merely a little slower than the other two
    /// (a busier disk) would otherwise fall behind without end, be faulted at its budget and be
    /// repaired, over and over; a moment of backpressure costs far less. A stuck replica still
    /// reaches its budget within a second and is faulted, and the no-progress watchdog stays.
    /// </summary>
    public double SlowReplicaBackpressureStart { get; init; } = 0.6;

    /// <summary>
    /// The most one slow Active replica may delay each guest write or flush (the curve's top; a
    /// replica under repair gets <see cref="MaxAdmissionDelay"/>, or under a heavy load it would be
    /// faulted at its budget and start its repair over, without end). At a queue
    /// depth of 32 and 5 ms a request, 2 ms slows the guest by at most about 30 %: enough to let a
    /// replica a little slower than the others keep up, not enough for a replica behind a slow
    /// link to halve the guest. Such a replica reaches its budget instead, is faulted, and
    /// catch-up repair copies what it missed. (At 20 ms, a link with 50-200 ms more latency held a
    /// guest doing 6,600 IOPS to 40 % of it in the slow-link incident.)
    /// </summary>
    public TimeSpan SlowReplicaMaxAdmissionDelay { get; init; } = TimeSpan.FromMilliseconds(2);

    /// <summary>
    /// Share of the time live repair may keep busy while the guest is doing IO: after copying an
    /// extent it pauses for (1 - d) / d times as long (at most <see cref="RepairMaxPause"/>), like a
    /// RAID rebuild's speed limit. Measured on the incident suite (2 cores, 64 MiB to copy): what the
    /// guest loses during a repair hardly depends on the pace (a replica under repair costs a third
    /// of the IOs at 0.1 and at 1.0 alike), but 0.1 took 37 s and 1.0 took 6 s; so copy briskly.
    /// </summary>
    public double RepairDutyCycle { get; init; } = 0.5;

    /// <summary>The same share while the guest is idle (no IO for 100 ms): repair then runs flat out.</summary>
    public double IdleRepairDutyCycle { get; init; } = 1.0;

    /// <summary>
    /// Longest pause between two extent copies. A copy that waited behind a deep queue of guest
    /// writes on a slow replica would otherwise earn a pause as long, and the repair would crawl.
    /// </summary>
    public TimeSpan RepairMaxPause { get; init; } = TimeSpan.FromMilliseconds(100);

    /// <summary>
    /// How often the volume scrubs itself (every block of every replica checked against its stored
    /// hash, bad copies rewritten), counted from startup and from the end of the last scrub; zero
    /// turns the periodic scrub off (`nbd-server scrub` still works). Rot in a copy no read picks
    /// is otherwise found only when a second copy fails too — then it is too late.
    /// </summary>
    public TimeSpan ScrubInterval { get; init; } = TimeSpan.FromDays(7);

    /// <summary>Share of the time a scrub may keep busy while the guest does IO (paced like repair); flat out when idle.</summary>
    public double ScrubDutyCycle { get; init; } = 0.25;

    /// <summary>
    /// At a stop (not a reload), how long a live repair in progress may go on to finish. Stopped
    /// half-way, the replica is left behind: its flush numbers say so and the next activation
    /// reconciles it, so nothing is lost; but with the guest gone a catch-up often needs only a
    /// moment more, and replicas left identical make the next start reconcile nothing. 0: stop at once.
    /// </summary>
    public TimeSpan StopRepairGrace { get; init; } = TimeSpan.FromSeconds(5);

    /// <summary>Largest repair transfer (one ExtentRead / ExtentWrite frame).</summary>
    public int RepairChunkBytes { get; init; } = 4 * 1024 * 1024;

    /// <summary>
    /// Extents one repair (live repair of a replica, or reconciliation at startup) copies at a time.
    /// One at a time, each step waits for a round trip and a disk; several keep both links and disks
    /// busy. Each extent in flight holds up to two <see cref="RepairChunkBytes"/> buffers.
    /// </summary>
    public int RepairParallelism { get; init; } = 4;

    /// <summary>
    /// Most MiB per second one replica's repair copies (0: no limit, only the duty cycle paces it).
    /// Changeable while running (<c>nbd-server repair --rate-limit</c>).
    /// </summary>
    public double RepairRateLimit { get; init; }

    /// <summary>
    /// Granule of the changed-block record kept for a replica out of service: a write marks every
    /// granule it touches, and the replica's catch-up copies whole granules. Smaller copies less
    /// after small random writes and costs more bits (one per granule of each extent written).
    /// </summary>
    public int ChangeRecordGranuleBytes { get; init; } = 4096;

    /// <summary>
    /// Most a replica's changed-block record may mark (0: no record; every repair compares extents).
    /// Past it the record is dropped, with one log line, and that replica's repair compares extents:
    /// after so long an outage a catch-up saves little. Memory: at most one bit per granule of the region.
    /// </summary>
    public long ChangeRecordMaxBytes { get; init; } = 16L << 30;

    /// <summary>Interval of the repeated-error summaries.</summary>
    public TimeSpan LogThrottleInterval { get; init; } = TimeSpan.FromSeconds(5);

    public void Validate()
    {
        if (Generation is 0 or > Wire.MaxGeneration)
        {
            throw new ArgumentException($"{nameof(Generation)} must be 1 to {Wire.MaxGeneration}; got {Generation}.");
        }
        if (MaxGenerationStep is 0 or > Wire.MaxGeneration || MaxFlushStep is 0 or >= Wire.MaxFlushNumber)
        {
            throw new ArgumentException($"{nameof(MaxGenerationStep)} must be 1 to {Wire.MaxGeneration} and {nameof(MaxFlushStep)} 1 to {Wire.MaxFlushNumber - 1}; got {MaxGenerationStep} and {MaxFlushStep}.");
        }
        if (Downstairs.Count != 3)
        {
            throw new ArgumentException($"exactly three downstairs are needed (got {Downstairs.Count}).");
        }
        if (MaxOutstandingJobs is < 1 or > 1000)
        {
            throw new ArgumentException($"{nameof(MaxOutstandingJobs)} must be 1..1000 (the downstairs client window is 1024); got {MaxOutstandingJobs}.");
        }
        if (MaxOutstandingBytes < 33L * 1024 * 1024)
        {
            throw new ArgumentException($"{nameof(MaxOutstandingBytes)} must hold at least one 32 MiB request; got {MaxOutstandingBytes}.");
        }
        if (BackpressureStart is <= 0 or >= 1 || SlowReplicaBackpressureStart is <= 0 or >= 1)
        {
            throw new ArgumentException($"{nameof(BackpressureStart)} and {nameof(SlowReplicaBackpressureStart)} must be in (0, 1); got {BackpressureStart} and {SlowReplicaBackpressureStart}.");
        }
        if (ScrubInterval < TimeSpan.Zero || ScrubInterval > TimeSpan.FromDays(49) || ScrubDutyCycle is <= 0 or > 1)
        {
            throw new ArgumentException($"{nameof(ScrubInterval)} must be 0 (off) to 49 days and {nameof(ScrubDutyCycle)} must be in (0, 1]; got {ScrubInterval} and {ScrubDutyCycle}.");
        }
        if (StopRepairGrace < TimeSpan.Zero || StopRepairGrace > TimeSpan.FromHours(1))
        {
            throw new ArgumentException($"{nameof(StopRepairGrace)} must be 0 to 1 hour; got {StopRepairGrace}.");
        }
        if (RepairMaxPause < TimeSpan.Zero)
        {
            throw new ArgumentException($"{nameof(RepairMaxPause)} must not be negative; got {RepairMaxPause}.");
        }
        if (RepairDutyCycle is <= 0 or > 1 || IdleRepairDutyCycle is <= 0 or > 1)
        {
            throw new ArgumentException($"{nameof(RepairDutyCycle)} and {nameof(IdleRepairDutyCycle)} must be in (0, 1]; got {RepairDutyCycle} and {IdleRepairDutyCycle}.");
        }
        if (RepairParallelism is < 1 or > 64 || RepairRateLimit is < 0 or > 1_000_000 || double.IsNaN(RepairRateLimit))
        {
            throw new ArgumentException($"{nameof(RepairParallelism)} must be 1..64 and {nameof(RepairRateLimit)} 0 (none) to 1000000 MiB/s; got {RepairParallelism} and {RepairRateLimit}.");
        }
        if (RepairChunkBytes is < 4096 or > 16 << 20)
        {
            throw new ArgumentException($"{nameof(RepairChunkBytes)} must be 4 KiB to 16 MiB; got {RepairChunkBytes}.");
        }
        if (ChangeRecordGranuleBytes is < 512 or > 64 << 20 || ChangeRecordMaxBytes < 0)
        {
            throw new ArgumentException($"{nameof(ChangeRecordGranuleBytes)} must be 512 bytes to 64 MiB and {nameof(ChangeRecordMaxBytes)} not negative; got {ChangeRecordGranuleBytes} and {ChangeRecordMaxBytes}.");
        }
        if (NoProgressTimeout <= TimeSpan.Zero || DegradedWriteTimeout < TimeSpan.Zero)
        {
            throw new ArgumentException("timeouts must be positive.");
        }
        ValidateTls();
    }

    private void ValidateTls()
    {
        if (DownstairsTlsDir is null)
        {
            if (DownstairsTlsNames.Count > 0 || DownstairsTlsPins.Count > 0)
            {
                throw new ArgumentException($"{nameof(DownstairsTlsNames)} and {nameof(DownstairsTlsPins)} need {nameof(DownstairsTlsDir)}.");
            }
            if (!Insecure && Downstairs.FirstOrDefault(e => !IPAddress.IsLoopback(e.Address)) is { } remote)
            {
                throw new ArgumentException($"{nameof(Downstairs)} {remote} is not on this host and {nameof(DownstairsTlsDir)} is not set: " +
                    $"the link would be plaintext, readable and forgeable by anyone on the path. Set {nameof(DownstairsTlsDir)} (certificates: nbd-certs), or {nameof(Insecure)} to allow it anyway.");
            }
            return;
        }
        if (DownstairsTlsNames.Count is not (0 or 1) && DownstairsTlsNames.Count != Downstairs.Count)
        {
            throw new ArgumentException($"{nameof(DownstairsTlsNames)} needs one name, or one per downstairs ({Downstairs.Count}); got {DownstairsTlsNames.Count}.");
        }
        if (DownstairsTlsPins.Count is not (0 or 1) && DownstairsTlsPins.Count != Downstairs.Count)
        {
            throw new ArgumentException($"{nameof(DownstairsTlsPins)} needs one pin, or one per downstairs ({Downstairs.Count}); got {DownstairsTlsPins.Count}.");
        }
        foreach (string pin in DownstairsTlsPins)
        {
            if (!TlsPeerVerifier.TryParsePin(pin, out _))
            {
                throw new ArgumentException($"{nameof(DownstairsTlsPins)}: '{pin}' is not a SHA-256 fingerprint (64 hex digits, colons allowed; `nbd-certs show` prints it).");
            }
        }
    }
}
