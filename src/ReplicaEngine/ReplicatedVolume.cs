using System.Buffers;
using System.Buffers.Binary;
using System.Diagnostics;
using Microsoft.Extensions.Logging;
using NbdServer.Common.Logging;
using NbdServer.Common.Volumes;
using NbdServer.Protocol;

namespace NbdServer.ReplicaEngine;

/// <summary>
/// The upstairs: a block volume kept on three downstairs. Every guest operation becomes a job with a
/// new id, sent to every replica in service in id order (each downstairs keeps overlapping jobs in
/// the order received, which is what keeps replicas identical). A write is acknowledged once two
/// replicas in service applied it; a flush once two made it durable. A replica that fails, stalls
/// or falls too far behind is faulted — its jobs are dropped, the guest goes on with two — and comes
/// back through live repair while IO continues.
/// </summary>
/// <remarks>
/// Which extents a returning replica must copy is decided from metadata, not from a replay log: the
/// engine knows, per extent, the (generation, flush number) every in-service replica recorded at the
/// last flush, and which extents were written since. A replica whose extent disagrees, is dirty, or
/// was written since the last flush gets that extent copied from a healthy replica. This covers a
/// brief disconnect, a long fault, a process restart and a late start with one mechanism, and its
/// memory does not grow with the outage.
/// </remarks>
public sealed partial class ReplicatedVolume : IBlockVolume
{
    private const int MaxReadAttempts = 3;

    /// <summary>Two faults of one replica within this window make it "flapping" (backoff, summarised logs).</summary>
    private static readonly TimeSpan FlapWindow = TimeSpan.FromSeconds(10);

    /// <summary>Source of every WRITE_ZEROES piece: never written, so one copy serves all requests.</summary>
    private static readonly ReadOnlyMemory<byte> SharedZeroes = new byte[4 << 20];
    private const string RepairablePrefix = "repairable: ";

    private readonly EngineOptions _options;
    private readonly ILogger _logger;
    private readonly IDownstairsConnector _connector;
    private readonly ReplicaLink[] _links;
    private readonly Lock _gate = new();
    private readonly List<(long First, long End, TaskCompletionSource Released)> _rangeLocks = [];
    private readonly List<RepairCopy> _repairCopies = [];
    private StartupStatus? _startup = new("probing", 0, 0, 0);
    private readonly HashSet<int> _dirty = [];
    private readonly Dictionary<ulong, HashSet<int>> _flushing = [];
    private readonly CancellationTokenSource _stopping = new();
    private readonly LogThrottle _throttle;
    private readonly Guid _upstairsId = Guid.NewGuid();
    private readonly Guid _sessionId = Guid.NewGuid();
    private readonly List<Task> _maintainers = [];
    private ExtentMeta[] _expected = [];
    private ITimer? _watchdog;
    private ulong _nextJobId;

    /// <summary>Stopwatch timestamp of the last guest read or write (repair pacing).</summary>
    private long _lastGuestIo;

    private static readonly TimeSpan GuestIdleAfter = TimeSpan.FromMilliseconds(100);
    private ulong _flushNumber;
    private int _blockSize;
    private int _extentBlocks;
    private int _extentCount;
    private int _maxIoBytes;
    private TaskCompletionSource _stateChanged = new(TaskCreationOptions.RunContinuationsAsynchronously);

    private ReplicatedVolume(EngineOptions options, ILogger logger, IDownstairsConnector connector)
    {
        options.Validate();
        _options = options;
        _logger = logger;
        _connector = connector;
        _links = [.. options.Downstairs.Select((endPoint, i) => new ReplicaLink(i, endPoint))];
        _throttle = new LogThrottle(logger, options.LogThrottleInterval);
    }

    public ulong Generation { get; private set; }

    public long Size { get; private set; }

    public VolumeFeatures Features =>
        VolumeFeatures.Flush | VolumeFeatures.ForceUnitAccess | VolumeFeatures.Trim | VolumeFeatures.WriteZeroes
        | VolumeFeatures.MultiConnection | VolumeFeatures.Cache;

    /// <summary>Any byte range works (partial blocks are read-modify-written), but whole blocks avoid that.</summary>
    public int MinimumBlockSize => 1;

    public int PreferredBlockSize => _blockSize;

    public int BlockSize => _blockSize;

    public int ExtentCount => _extentCount;

    /// <summary>Connects to the three downstairs, fences older upstairs, reconciles, and returns a volume ready for the guest.</summary>
    public static Task<ReplicatedVolume> StartAsync(EngineOptions options, ILogger logger, CancellationToken cancellationToken) =>
        StartAsync(options, logger, TcpDownstairsConnector.Create(options), cancellationToken);

    /// <param name="created">Called with the volume before it activates, e.g. to serve its status (<see cref="EngineStatus.Startup"/>) during a long reconciliation.</param>
    public static Task<ReplicatedVolume> StartAsync(EngineOptions options, ILogger logger, Action<ReplicatedVolume>? created, CancellationToken cancellationToken) =>
        StartAsync(options, logger, TcpDownstairsConnector.Create(options), cancellationToken, created);

    internal static async Task<ReplicatedVolume> StartAsync(EngineOptions options, ILogger logger, IDownstairsConnector connector, CancellationToken cancellationToken,
        Action<ReplicatedVolume>? created = null)
    {
        var volume = new ReplicatedVolume(options, logger, connector);
        try
        {
            created?.Invoke(volume);
            await volume.ActivateAsync(cancellationToken);
            lock (volume._gate)
            {
                volume._startup = null;
            }
        }
        catch
        {
            await volume.DisposeAsync();
            throw;
        }
        return volume;
    }

    // ------------------------------------------------------------------ guest operations

    public async ValueTask ReadAsync(long offset, Memory<byte> destination, CancellationToken cancellationToken)
    {
        Volatile.Write(ref _lastGuestIo, Stopwatch.GetTimestamp());
        if (destination.IsEmpty)
        {
            return;
        }
        long firstBlock = offset / _blockSize;
        long endBlock = (offset + destination.Length + _blockSize - 1) / _blockSize;
        int lead = (int)(offset % _blockSize);
        if (lead == 0 && destination.Length % _blockSize == 0)
        {
            await ReadBlocksAsync(firstBlock, destination, cancellationToken);
            return;
        }
        int bytes = checked((int)((endBlock - firstBlock) * _blockSize));
        byte[] buffer = ArrayPool<byte>.Shared.Rent(bytes);
        try
        {
            await ReadBlocksAsync(firstBlock, buffer.AsMemory(0, bytes), cancellationToken);
            buffer.AsSpan(lead, destination.Length).CopyTo(destination.Span);
        }
        finally
        {
            ArrayPool<byte>.Shared.Return(buffer);
        }
    }

    public async ValueTask WriteAsync(long offset, ReadOnlyMemory<byte> source, WriteOptions options, CancellationToken cancellationToken)
    {
        Volatile.Write(ref _lastGuestIo, Stopwatch.GetTimestamp());
        if (!source.IsEmpty)
        {
            await WriteRangeAsync(offset, source, cancellationToken);
        }
        if ((options & WriteOptions.ForceUnitAccess) != 0)
        {
            await FlushAsync(cancellationToken);
        }
    }

    public async ValueTask WriteZeroesAsync(long offset, long length, WriteOptions options, CancellationToken cancellationToken)
    {
        if ((options & WriteOptions.FastZero) != 0)
        {
            // Zeroes travel as ordinary writes to three replicas: never "fast".
            throw new VolumeException(VolumeError.NotSupported, "write zeroes is not fast on a replicated volume");
        }
        // A multi-GiB request is cut into bounded pieces: memory stays at one piece, not the length.
        // The pieces all come from one read-only buffer of zeroes shared by every request, instead of
        // a 4 MiB buffer rented (and cleared) per request: many small WRITE_ZEROES cost no memory.
        int piece = Math.Min(_maxIoBytes, SharedZeroes.Length);
        for (long done = 0; done < length; done += piece)
        {
            int count = (int)Math.Min(piece, length - done);
            await WriteRangeAsync(offset + done, SharedZeroes[..count], cancellationToken);
        }
        if ((options & WriteOptions.ForceUnitAccess) != 0)
        {
            await FlushAsync(cancellationToken);
        }
    }

    /// <summary>TRIM is advisory in NBD; the replicas keep the data (and stay identical), which is always correct.</summary>
    public ValueTask TrimAsync(long offset, long length, WriteOptions options, CancellationToken cancellationToken) => ValueTask.CompletedTask;

    public ValueTask<IReadOnlyList<AllocationExtent>> GetAllocationAsync(long offset, long length, int maxExtents, CancellationToken cancellationToken) =>
        ValueTask.FromResult<IReadOnlyList<AllocationExtent>>([new AllocationExtent(length, AllocationState.Data)]);

    public async ValueTask FlushAsync(CancellationToken cancellationToken)
    {
        await AdmitWriteAsync(0, cancellationToken);
        var job = new ReplicatedJob(null, null);
        ulong flushNumber;
        HashSet<int> flushed;
        lock (_gate)
        {
            // Reconciliation leaves every adopted flush number below the ceiling, so this cannot
            // happen in practice; if it ever did, refuse clearly rather than wrap (a wrapped number
            // would lose every later reconciliation).
            if (_flushNumber >= Wire.MaxFlushNumber - 1)
            {
                throw new VolumeException(VolumeError.IoError, $"flush numbers are exhausted (at {_flushNumber}, ceiling {Wire.MaxFlushNumber}): the volume cannot record another flush");
            }
            flushNumber = checked(++_flushNumber);
            flushed = [.. _dirty];
            _dirty.Clear();
            _flushing[flushNumber] = flushed;
            ulong id = ++_nextJobId;
            foreach (ReplicaLink link in _links)
            {
                // A replica under live repair flushes too, so its metadata stays in lockstep with the
                // others; its acks don't count. It leaves the extents still to be copied unstamped
                // (the repair marked them pending on the downstairs), and it is not excused: a
                // refused flush faults it like any other replica.
                if (link.ReceivesWrites && link.Client is { } client)
                {
                    link.Charge(0);
                    Track(client.FlushAsync(id, flushNumber, Generation), link, client, job, counted: link.State == ReplicaState.Active, bytes: 0, what: "flush");
                }
            }
            job.Seal();
        }
        bool ok = await job.Acked;
        lock (_gate)
        {
            _flushing.Remove(flushNumber);
            if (ok)
            {
                foreach (int extent in flushed)
                {
                    _expected[extent] = new ExtentMeta(Generation, flushNumber, false);
                }
            }
            else
            {
                _dirty.UnionWith(flushed);
            }
        }
        if (!ok)
        {
            throw new VolumeException(VolumeError.IoError, $"flush {flushNumber} could not be made durable on two replicas ({InServiceCount()} in service)");
        }
    }

    // ------------------------------------------------------------------ writes

    private async ValueTask WriteRangeAsync(long offset, ReadOnlyMemory<byte> source, CancellationToken cancellationToken)
    {
        int lead = (int)(offset % _blockSize);
        int tail = (int)((offset + source.Length) % _blockSize);
        long firstBlock = offset / _blockSize;
        if (lead == 0 && tail == 0)
        {
            for (int done = 0; done < source.Length; done += _maxIoBytes)
            {
                int count = Math.Min(_maxIoBytes, source.Length - done);
                await WriteBlocksAsync(firstBlock + (done / _blockSize), source.Slice(done, count), lockHeld: false, cancellationToken);
            }
            return;
        }
        // Partial blocks: read-modify-write under a range lock, so no other write to these blocks is
        // submitted between our read and our write (it would be silently undone).
        long endBlock = (offset + source.Length + _blockSize - 1) / _blockSize;
        int bytes = checked((int)((endBlock - firstBlock) * _blockSize));
        byte[] buffer = ArrayPool<byte>.Shared.Rent(bytes);
        try
        {
            using (await AcquireRangeAsync(firstBlock, endBlock, cancellationToken))
            {
                if (lead != 0)
                {
                    await ReadBlocksAsync(firstBlock, buffer.AsMemory(0, _blockSize), cancellationToken);
                }
                if (tail != 0 && (endBlock - 1 > firstBlock || lead == 0))
                {
                    await ReadBlocksAsync(endBlock - 1, buffer.AsMemory(bytes - _blockSize, _blockSize), cancellationToken);
                }
                source.CopyTo(buffer.AsMemory(lead));
                for (int done = 0; done < bytes; done += _maxIoBytes)
                {
                    int count = Math.Min(_maxIoBytes, bytes - done);
                    await WriteBlocksAsync(firstBlock + (done / _blockSize), buffer.AsMemory(done, count), lockHeld: true, cancellationToken);
                }
            }
        }
        finally
        {
            ArrayPool<byte>.Shared.Return(buffer);
        }
    }

    /// <summary>One write job of whole blocks: admitted, copied into a buffer the job owns, sent to every replica taking writes.</summary>
    private async ValueTask WriteBlocksAsync(long firstBlock, ReadOnlyMemory<byte> data, bool lockHeld, CancellationToken cancellationToken)
    {
        await AdmitWriteAsync(data.Length, cancellationToken);
        int blocks = data.Length / _blockSize;
        // The job owns a copy: the guest's buffer is recycled at the ack (two replicas), the third may still be sending.
        byte[] owned = ArrayPool<byte>.Shared.Rent(data.Length);
        byte[] hashes = ArrayPool<byte>.Shared.Rent(blocks * Wire.HashSize);
        data.CopyTo(owned);
        BlockContext.HashBlocks(owned.AsSpan(0, data.Length), _blockSize, hashes.AsSpan(0, blocks * Wire.HashSize));
        var job = new ReplicatedJob(owned, hashes);
        ReadOnlyMemory<byte> payload = owned.AsMemory(0, data.Length);
        ReadOnlyMemory<byte> payloadHashes = hashes.AsMemory(0, blocks * Wire.HashSize);
        while (true)
        {
            Task? busy;
            lock (_gate)
            {
                busy = (lockHeld ? null : OverlappingLockLocked(firstBlock, firstBlock + blocks)) ?? SaturatedLocked();
                if (busy is null)
                {
                    ulong id = ++_nextJobId;
                    MarkDirtyLocked(firstBlock, blocks);
                    foreach (ReplicaLink link in _links)
                    {
                        if (!link.ReceivesWrites || link.Client is not { } client || !WithinBudgetLocked(link, data.Length))
                        {
                            continue;
                        }
                        if (TryDeferForRepairLocked(link, client, id, firstBlock, blocks, payload, payloadHashes, job))
                        {
                            continue;
                        }
                        (bool send, bool counted) = WriteRoleLocked(link, firstBlock, blocks);
                        if (!send)
                        {
                            continue;
                        }
                        link.Charge(data.Length);
                        Track(client.WriteAsync(id, firstBlock, payload, payloadHashes), link, client, job, counted, data.Length, "write");
                    }
                    job.Seal();
                    break;
                }
            }
            await busy.WaitAsync(cancellationToken);
        }
        if (!await job.Acked)
        {
            throw new VolumeException(VolumeError.IoError, $"write of blocks {firstBlock}+{blocks} could not be made safe on two replicas ({InServiceCount()} in service)");
        }
    }

    /// <summary>
    /// What a write means to one replica. In service: sent, and its ack counts. Under live repair,
    /// by the write's extents: all already copied, it is sent and counts (the replica holds them
    /// exactly as one in service does; without this every write during a repair waits for the slower
    /// of the other two); all still to be copied, it is not sent at all (the copy, read from a
    /// replica that has the write, brings it; sending it is work for nothing); a mix, sent, not counted.
    /// An extent being copied right now never gets here: its writes are deferred (TryDeferForRepairLocked).
    /// </summary>
    private (bool Send, bool Counted) WriteRoleLocked(ReplicaLink link, long firstBlock, int blocks)
    {
        if (link.State != ReplicaState.Repairing)
        {
            return (true, link.State == ReplicaState.Active);
        }
        int first = (int)(firstBlock / _extentBlocks);
        int last = (int)((firstBlock + blocks - 1) / _extentBlocks);
        int pending = 0;
        for (int e = first; e <= last; e++)
        {
            if (link.PendingRepair.Contains(e))
            {
                pending++;
            }
        }
        return pending == 0 ? (true, true) : pending == last - first + 1 ? (false, false) : (true, false);
    }

    /// <summary>
    /// With two replicas or fewer in service a replica at its job budget can't be faulted (that would
    /// fail every write), so submission waits briefly instead: the connection's job window must never
    /// fill, or requests would stop leaving in job order. The watchdog still faults one that is stuck.
    /// </summary>
    private Task? SaturatedLocked()
    {
        if (InServiceCountLocked() > 2)
        {
            return null;
        }
        foreach (ReplicaLink link in _links)
        {
            if (link.State == ReplicaState.Active && link.OutstandingJobs >= _options.MaxOutstandingJobs)
            {
                return Task.Delay(2);
            }
        }
        return null;
    }

    /// <summary>
    /// Budget check at submission. Over budget with two others in service: fault it (never let one
    /// replica hold the other two hostage). With fewer in service, keep it: admission backpressure
    /// and the no-progress watchdog bound it instead.
    /// </summary>
    private bool WithinBudgetLocked(ReplicaLink link, long bytes)
    {
        bool over = link.OutstandingJobs + 1 > _options.MaxOutstandingJobs || link.OutstandingBytes + bytes > _options.MaxOutstandingBytes;
        if (!over)
        {
            return true;
        }
        if (link.State == ReplicaState.Repairing || InServiceCountLocked() > 2)
        {
            FaultLocked(link, $"outstanding work over budget ({link.OutstandingJobs} jobs, {link.OutstandingBytes} bytes; limits {_options.MaxOutstandingJobs} jobs, {_options.MaxOutstandingBytes} bytes)");
            return false;
        }
        return true;
    }

    /// <summary>
    /// Waits while fewer than two replicas are in service (bounded, then EIO), and applies backpressure
    /// when the second-least-loaded replica in service is past <see cref="EngineOptions.BackpressureStart"/>
    /// of its budget (two slow replicas slow the guest, smoothly), or the most loaded one is past
    /// <see cref="EngineOptions.SlowReplicaBackpressureStart"/>: one slow replica costs the guest at
    /// most a short delay near its budget, never a stall, and is faulted if it still cannot keep up.
    /// </summary>
    private async ValueTask AdmitWriteAsync(long bytes, CancellationToken cancellationToken)
    {
        long deadline = Stopwatch.GetTimestamp() + (long)(_options.DegradedWriteTimeout.TotalSeconds * Stopwatch.Frequency);
        while (true)
        {
            Task changed;
            double load, pressure;
            lock (_gate)
            {
                changed = _stateChanged.Task;
                load = SecondLeastLoadLocked(bytes);
                pressure = Math.Max(Excess(load, _options.BackpressureStart), Excess(HighestLoadLocked(bytes), _options.SlowReplicaBackpressureStart));
                if (InServiceCountLocked() >= 2 && pressure == 0)
                {
                    return;
                }
            }
            if (InServiceCount() >= 2)
            {
                await Task.Delay(TimeSpan.FromTicks(Math.Max(1, (long)(_options.MaxAdmissionDelay.Ticks * pressure * pressure))), cancellationToken);
                if (load < 1.0)
                {
                    return;
                }
                // At the full budget with only two in service: wait for it to drain (the watchdog faults it if it can't).
                continue;
            }
            TimeSpan left = Stopwatch.GetElapsedTime(deadline, Stopwatch.GetTimestamp()) * -1;
            if (left <= TimeSpan.Zero)
            {
                throw new VolumeException(VolumeError.IoError, $"only {InServiceCount()} replica(s) in service; a write needs two");
            }
            await Task.WhenAny(changed, Task.Delay(left, cancellationToken));
            cancellationToken.ThrowIfCancellationRequested();
        }
    }

    /// <summary>How far <paramref name="load"/> is past <paramref name="start"/>, on the way to a full budget: 0..1.</summary>
    private static double Excess(double load, double start) => Math.Clamp((load - start) / (1.0 - start), 0, 1);

    /// <summary>A replica's share of its budget once this job is added; writes queued behind a repair copy count too.</summary>
    private double LoadLocked(ReplicaLink link, long bytes)
    {
        (int deferredJobs, long deferredBytes) = DeferredLocked(link);
        return Math.Max((link.OutstandingJobs + deferredJobs + 1) / (double)_options.MaxOutstandingJobs,
            (link.OutstandingBytes + deferredBytes + bytes) / (double)_options.MaxOutstandingBytes);
    }

    private (int Jobs, long Bytes) DeferredLocked(ReplicaLink link)
    {
        foreach (RepairCopy copy in _repairCopies)
        {
            if (copy.Target == link)
            {
                return (copy.Deferred.Count, copy.DeferredBytes);
            }
        }
        return (0, 0);
    }

    /// <summary>Load of the replica taking writes that is furthest behind.</summary>
    private double HighestLoadLocked(long bytes)
    {
        double highest = 0;
        foreach (ReplicaLink link in _links)
        {
            if (link.ReceivesWrites)
            {
                highest = Math.Max(highest, LoadLocked(link, bytes));
            }
        }
        return highest;
    }

    private double SecondLeastLoadLocked(long bytes)
    {
        Span<double> loads = stackalloc double[3];
        int count = 0;
        foreach (ReplicaLink link in _links)
        {
            if (link.State == ReplicaState.Active)
            {
                loads[count++] = LoadLocked(link, bytes);
            }
        }
        if (count < 2)
        {
            return 0;
        }
        loads[..count].Sort();
        return loads[1];
    }

    // ------------------------------------------------------------------ reads

    private async ValueTask ReadBlocksAsync(long firstBlock, Memory<byte> destination, CancellationToken cancellationToken)
    {
        for (int done = 0; done < destination.Length; done += _maxIoBytes)
        {
            int count = Math.Min(_maxIoBytes, destination.Length - done);
            await ReadChunkAsync(firstBlock + (done / _blockSize), destination.Slice(done, count), cancellationToken);
        }
    }

    /// <summary>
    /// Reads from one replica in service and checks every block against its stored hash. A bad block
    /// or an error sends the read to another replica; the bad copy is then repaired from the good one.
    /// </summary>
    private async ValueTask ReadChunkAsync(long firstBlock, Memory<byte> destination, CancellationToken cancellationToken)
    {
        int blocks = destination.Length / _blockSize;
        byte[] hashes = ArrayPool<byte>.Shared.Rent(blocks * Wire.HashSize);
        var bad = new List<(ReplicaLink Link, string Problem)>();
        try
        {
            for (int attempt = 0; attempt < MaxReadAttempts; attempt++)
            {
                (ReplicaLink link, string? problem, bool repairable) = await ReadOnceAsync(firstBlock, destination, hashes.AsMemory(0, blocks * Wire.HashSize), bad, cancellationToken);
                if (problem is null)
                {
                    foreach ((ReplicaLink badLink, string badProblem) in bad.Where(b => b.Problem.StartsWith(RepairablePrefix, StringComparison.Ordinal)))
                    {
                        EngineLog.ReadRepaired(_logger, firstBlock, blocks, badLink.Index, badProblem[RepairablePrefix.Length..], link.Index);
                        await RepairBlocksAsync(badLink, link, firstBlock, blocks, cancellationToken);
                    }
                    return;
                }
                // A lost connection or a timeout is the fault path's business; bad data or an IO error is repaired here.
                bad.Add((link, repairable ? RepairablePrefix + problem : problem));
            }
            throw new VolumeException(VolumeError.IoError, $"read of blocks {firstBlock}+{blocks} failed on every replica: {string.Join("; ", bad.Select(b => $"replica {b.Link.Index}: {b.Problem}"))}");
        }
        finally
        {
            ArrayPool<byte>.Shared.Return(hashes);
        }
    }

    /// <summary>
    /// One read from the least-loaded replica in service not yet tried; the problem, or null if the
    /// data verified. The replica reads into a buffer the engine owns, copied out only on success: a
    /// read that times out on a stalled replica may still complete later, and must never land in a
    /// guest buffer that has since been reused.
    /// </summary>
    private async ValueTask<(ReplicaLink Link, string? Problem, bool Repairable)> ReadOnceAsync(long firstBlock, Memory<byte> destination, Memory<byte> hashes,
        List<(ReplicaLink Link, string Problem)> tried, CancellationToken cancellationToken)
    {
        ReplicaLink? link = null;
        IDownstairs? client = null;
        Task<DownstairsResult> read;
        int length = destination.Length;
        int blocks = length / _blockSize;
        byte[] data = ArrayPool<byte>.Shared.Rent(length);
        byte[] stored = ArrayPool<byte>.Shared.Rent(blocks * Wire.HashSize);
        lock (_gate)
        {
            foreach (ReplicaLink candidate in _links)
            {
                // A replica at its job budget is skipped: more work would only queue behind what it owes.
                if (candidate.State == ReplicaState.Active && candidate.Client is not null && !tried.Exists(t => t.Link == candidate)
                    && candidate.OutstandingJobs < _options.MaxOutstandingJobs
                    && (link is null || candidate.OutstandingJobs < link.OutstandingJobs))
                {
                    link = candidate;
                }
            }
            if (link is null)
            {
                ArrayPool<byte>.Shared.Return(data);
                ArrayPool<byte>.Shared.Return(stored);
                throw new VolumeException(VolumeError.IoError, $"no replica in service can serve the read of blocks {firstBlock}+{blocks}");
            }
            client = link.Client!;
            link.Charge(length);
            read = client.ReadAsync(++_nextJobId, firstBlock, data.AsMemory(0, length), stored.AsMemory(0, blocks * Wire.HashSize), CancellationToken.None);
        }
        ReplicaLink chosen = link;
        IDownstairs chosenClient = client;
        // Accounting and buffer return happen when the replica answers, however late.
        Task<(bool Ok, string? Problem)> settled = read.ContinueWith(
            t =>
            {
                bool ok = t.IsCompletedSuccessfully && t.Result.IsOk;
                string? problem = t.IsCompletedSuccessfully ? (ok ? null : t.Result.ToString()) : $"connection lost: {t.Exception?.InnerException?.Message ?? "cancelled"}";
                lock (_gate)
                {
                    if (chosen.Client == chosenClient)
                    {
                        chosen.Complete(length, ok);
                        if (!t.IsCompletedSuccessfully)
                        {
                            FaultLocked(chosen, $"read failed: {problem}");
                        }
                    }
                }
                return (ok, problem);
            },
            CancellationToken.None,
            TaskContinuationOptions.None,
            TaskScheduler.Default);
        Task finished = await Task.WhenAny(settled, Task.Delay(_options.ReadAttemptTimeout, cancellationToken));
        if (finished != settled)
        {
            _ = settled.ContinueWith(_ => { ArrayPool<byte>.Shared.Return(data); ArrayPool<byte>.Shared.Return(stored); }, TaskScheduler.Default);
            cancellationToken.ThrowIfCancellationRequested();
            return (chosen, $"no answer within {_options.ReadAttemptTimeout.TotalMilliseconds:0} ms", false);
        }
        try
        {
            (bool ok, string? problem) = await settled;
            if (!ok)
            {
                // An error answer (EIO on a bad sector) is worth a rewrite; a lost connection is not.
                return (chosen, problem, read.IsCompletedSuccessfully);
            }
            for (int i = 0; i < blocks; i++)
            {
                ulong hash = BinaryPrimitives.ReadUInt64LittleEndian(stored.AsSpan(i * Wire.HashSize));
                if (!BlockContext.Verify(data.AsSpan(i * _blockSize, _blockSize), hash))
                {
                    chosen.CountError();
                    return (chosen, $"block {firstBlock + i} does not match its stored hash", true);
                }
            }
            data.AsSpan(0, length).CopyTo(destination.Span);
            stored.AsSpan(0, blocks * Wire.HashSize).CopyTo(hashes.Span);
            return (chosen, null, false);
        }
        finally
        {
            ArrayPool<byte>.Shared.Return(data);
            ArrayPool<byte>.Shared.Return(stored);
        }
    }

    /// <summary>
    /// Rewrites blocks on a replica that returned them bad, from a replica that returned them good.
    /// Under a range lock and with a fresh read, so a guest write racing the repair is never undone.
    /// </summary>
    private async ValueTask RepairBlocksAsync(ReplicaLink target, ReplicaLink source, long firstBlock, int blocks, CancellationToken cancellationToken)
    {
        int bytes = blocks * _blockSize;
        byte[] data = ArrayPool<byte>.Shared.Rent(bytes);
        byte[] hashes = ArrayPool<byte>.Shared.Rent(blocks * Wire.HashSize);
        try
        {
            // Never wait here: the read being repaired may itself run under a range lock (read-modify-write),
            // and waiting for our own lock would deadlock. A busy range is repaired by a later read.
            if (TryAcquireRange(firstBlock, firstBlock + blocks) is not { } lease)
            {
                return;
            }
            using (lease)
            {
                var exclude = _links.Where(l => l != source).Select(l => (l, "not the repair source")).ToList();
                (_, string? problem, _) = await ReadOnceAsync(firstBlock, data.AsMemory(0, bytes), hashes.AsMemory(0, blocks * Wire.HashSize), exclude, cancellationToken);
                if (problem is not null)
                {
                    return;
                }
                // The read handed back the *stored* hashes, where 0 means "never written"; a write must carry
                // the hash of its data (the downstairs checks it), so a never-written (zero) block in the range
                // made every repair write fail with "hash mismatch" and faulted every replica it went to,
                // healthy ones included (incident suite, rot scenario). The data just verified: hash it.
                BlockContext.HashBlocks(data.AsSpan(0, bytes), _blockSize, hashes.AsSpan(0, blocks * Wire.HashSize));
                // The good copy goes to every replica taking writes, not only the bad one: the extent
                // then turns dirty on all of them and the next flush gives all the same (generation,
                // flush number). Written to the bad replica alone, its extent would carry a higher
                // flush number than the others' for the same data, and reconciliation / compare
                // would see replicas that differ.
                var writes = new List<(ReplicaLink Link, IDownstairs Client, Task<DownstairsResult> Task)>(_links.Length);
                lock (_gate)
                {
                    if (!target.ReceivesWrites || target.Client is null)
                    {
                        return;
                    }
                    foreach (ReplicaLink link in _links)
                    {
                        if (link.ReceivesWrites && link.Client is { } client)
                        {
                            link.Charge(bytes);
                            writes.Add((link, client, client.WriteAsync(++_nextJobId, firstBlock, data.AsMemory(0, bytes), hashes.AsMemory(0, blocks * Wire.HashSize), cancellationToken)));
                        }
                    }
                }
                foreach ((ReplicaLink link, IDownstairs client, Task<DownstairsResult> write) in writes)
                {
                    bool ok;
                    string reason;
                    try
                    {
                        DownstairsResult r = await write;
                        ok = r.IsOk;
                        reason = r.ToString();
                    }
                    catch (Exception e) when (e is not OperationCanceledException)
                    {
                        ok = false;
                        reason = e.Message;
                    }
                    lock (_gate)
                    {
                        if (link.Client == client)
                        {
                            link.Complete(bytes, ok);
                            if (!ok)
                            {
                                FaultLocked(link, $"read repair write failed: {reason}");
                            }
                        }
                    }
                }
            }
        }
        finally
        {
            ArrayPool<byte>.Shared.Return(data);
            ArrayPool<byte>.Shared.Return(hashes);
        }
    }

    // ------------------------------------------------------------------ job tracking

    /// <summary>Accounts for one replica's answer to a job; an error or a lost connection faults that replica.</summary>
    private void Track(Task<DownstairsResult> task, ReplicaLink link, IDownstairs client, ReplicatedJob job, bool counted, long bytes, string what,
        bool alreadyAdded = false)
    {
        if (!alreadyAdded)
        {
            job.Add(counted);
        }
        task.ContinueWith(
            t =>
            {
                bool ok = t.IsCompletedSuccessfully && t.Result.IsOk;
                lock (_gate)
                {
                    if (link.Client == client)
                    {
                        link.Complete(bytes, ok);
                        if (!ok)
                        {
                            string reason = t.IsCompletedSuccessfully ? $"{what} failed: {t.Result}" : $"connection lost during {what}: {t.Exception?.InnerException?.Message ?? "cancelled"}";
                            FaultLocked(link, reason);
                        }
                    }
                }
                job.Done(counted, ok);
            },
            CancellationToken.None,
            TaskContinuationOptions.None,
            TaskScheduler.Default);
    }

    /// <summary>Takes a replica out of service: drops its jobs (closing the connection frees their memory), wakes its reconnect loop.</summary>
    private void FaultLocked(ReplicaLink link, string reason)
    {
        if (link.State is ReplicaState.Faulted or ReplicaState.Connecting)
        {
            return;
        }
        int jobs = link.OutstandingJobs;
        long bytes = link.OutstandingBytes;
        IDownstairs? client = link.Client;
        link.Drop();
        link.State = ReplicaState.Faulted;
        link.Client = null;
        link.LastFault = reason;
        link.RepairDone = 0;
        link.RepairTotal = 0;
        int inService = InServiceCountLocked();
        // A replica that fails again soon after returning (a disk still full, an extent still poisoned)
        // backs off exponentially and its repeated faults are summarised, so a fault loop stays quiet.
        bool flapping = link.IsFlapping(FlapWindow);
        link.ReconnectDelay = flapping
            ? TimeSpan.FromTicks(Math.Min(Math.Max(link.ReconnectDelay.Ticks * 2, _options.ReconnectInitialDelay.Ticks), _options.ReconnectMaxDelay.Ticks))
            : TimeSpan.Zero;
        link.LastFaultAt = Stopwatch.GetTimestamp();
        if (flapping)
        {
            _throttle.Report(LogLevel.Warning, $"Replica {link.Index} ({link.EndPoint}) faulted again", () => $"{reason}; reconnecting in {link.ReconnectDelay.TotalMilliseconds:0} ms");
        }
        else
        {
            EngineLog.Faulted(_logger, link.Index, link.EndPoint.ToString(), reason, jobs, bytes, inService);
        }
        if (inService < 2)
        {
            EngineLog.Degraded(_logger, inService);
        }
        if (client is not null)
        {
            _ = Task.Run(async () => await client.DisposeAsync());
        }
        SignalStateChangedLocked();
        link.RequestConnection();
    }

    private void SignalStateChangedLocked()
    {
        TaskCompletionSource previous = _stateChanged;
        _stateChanged = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
        previous.TrySetResult();
    }

    private int InServiceCount()
    {
        lock (_gate)
        {
            return InServiceCountLocked();
        }
    }

    private int InServiceCountLocked() => _links.Count(l => l.State == ReplicaState.Active);

    private void MarkDirtyLocked(long firstBlock, int blocks)
    {
        int first = (int)(firstBlock / _extentBlocks);
        int last = (int)((firstBlock + blocks - 1) / _extentBlocks);
        for (int e = first; e <= last; e++)
        {
            _dirty.Add(e);
        }
    }

    // ------------------------------------------------------------------ extent copies during live repair

    /// <summary>
    /// An extent being copied to a repairing replica. Guest writes to it are not held: they go to the
    /// replicas in service at once (the guest's ack never waits for the copy) and are queued for the
    /// repairing replica, which gets them, in order, right after the copy is committed. Sent to it
    /// earlier, the commit would overwrite them with the older copy.
    /// </summary>
    private sealed class RepairCopy(ReplicaLink target, IDownstairs client, long first, long end)
    {
        public ReplicaLink Target { get; } = target;

        public IDownstairs Client { get; } = client;

        public long First { get; } = first;

        public long End { get; } = end;

        public List<(ulong Id, long FirstBlock, ReadOnlyMemory<byte> Data, ReadOnlyMemory<byte> Hashes, ReplicatedJob Job)> Deferred { get; } = [];

        public long DeferredBytes { get; set; }
    }

    private bool TryDeferForRepairLocked(ReplicaLink link, IDownstairs client, ulong id, long firstBlock, int blocks,
        ReadOnlyMemory<byte> data, ReadOnlyMemory<byte> hashes, ReplicatedJob job)
    {
        foreach (RepairCopy copy in _repairCopies)
        {
            if (copy.Target == link && copy.Client == client && copy.First < firstBlock + blocks && firstBlock < copy.End)
            {
                if (link.OutstandingJobs + copy.Deferred.Count + 1 > _options.MaxOutstandingJobs
                    || link.OutstandingBytes + copy.DeferredBytes + data.Length > _options.MaxOutstandingBytes)
                {
                    FaultLocked(link, $"repair fell behind: {copy.Deferred.Count} writes ({copy.DeferredBytes} bytes) queued behind the copy of blocks {copy.First}..{copy.End}, {link.OutstandingJobs} more outstanding");
                    return true;
                }
                // Holds the job's buffer (not counted toward its ack) until the write is sent or dropped.
                job.Add(counted: false);
                copy.Deferred.Add((id, firstBlock, data, hashes, job));
                copy.DeferredBytes += data.Length;
                return true;
            }
        }
        return false;
    }

    private RepairCopy BeginRepairCopy(ReplicaLink target, IDownstairs client, int extent)
    {
        var copy = new RepairCopy(target, client, (long)extent * _extentBlocks, (long)(extent + 1) * _extentBlocks);
        lock (_gate)
        {
            _repairCopies.Add(copy);
        }
        return copy;
    }

    /// <summary>Sends the queued writes (after a committed copy) or drops them (the copy failed; the extent is copied again).</summary>
    private void EndRepairCopy(RepairCopy copy, bool committed)
    {
        List<(ulong Id, long FirstBlock, ReadOnlyMemory<byte> Data, ReadOnlyMemory<byte> Hashes, ReplicatedJob Job)> dropped = [];
        lock (_gate)
        {
            _repairCopies.Remove(copy);
            bool send = committed && copy.Target.Client == copy.Client && copy.Target.ReceivesWrites;
            if (send)
            {
                // In the same step as the copy stops deferring: from here on the replica holds this
                // extent, so its writes are sent (and counted); none may fall between "not deferred"
                // and "not pending", where WriteRoleLocked would skip it as still to be copied.
                copy.Target.PendingRepair.Remove((int)(copy.First / _extentBlocks));
                copy.Target.RepairDone++;
            }
            foreach (var d in copy.Deferred)
            {
                if (!send)
                {
                    dropped.Add(d);
                    continue;
                }
                copy.Target.Charge(d.Data.Length);
                Track(copy.Client.WriteAsync(d.Id, d.FirstBlock, d.Data, d.Hashes), copy.Target, copy.Client, d.Job, counted: false, d.Data.Length, "write", alreadyAdded: true);
            }
        }
        foreach (var d in dropped)
        {
            d.Job.Done(counted: false, ok: false);
        }
    }

    // ------------------------------------------------------------------ range locks

    private Task? OverlappingLockLocked(long first, long end)
    {
        foreach ((long f, long e, TaskCompletionSource released) in _rangeLocks)
        {
            if (f < end && first < e)
            {
                return released.Task;
            }
        }
        return null;
    }

    private async ValueTask<RangeLease> AcquireRangeAsync(long first, long end, CancellationToken cancellationToken)
    {
        while (true)
        {
            Task? busy;
            lock (_gate)
            {
                busy = OverlappingLockLocked(first, end);
                if (busy is null)
                {
                    var released = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
                    _rangeLocks.Add((first, end, released));
                    return new RangeLease(this, released);
                }
            }
            await busy.WaitAsync(cancellationToken);
        }
    }

    private RangeLease? TryAcquireRange(long first, long end)
    {
        lock (_gate)
        {
            if (OverlappingLockLocked(first, end) is not null)
            {
                return null;
            }
            var released = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
            _rangeLocks.Add((first, end, released));
            return new RangeLease(this, released);
        }
    }

    private void ReleaseRange(TaskCompletionSource released)
    {
        lock (_gate)
        {
            _rangeLocks.RemoveAll(l => l.Released == released);
        }
        released.TrySetResult();
    }

    private readonly struct RangeLease(ReplicatedVolume owner, TaskCompletionSource released) : IDisposable
    {
        public void Dispose() => owner.ReleaseRange(released);
    }

    /// <summary>
    /// One job's progress across replicas: acked once two replicas in service succeeded; failed once
    /// that can no longer happen. Its buffers go back to the pool when every replica has answered.
    /// </summary>
    private sealed class ReplicatedJob(byte[]? data, byte[]? hashes)
    {
        private const int Quorum = 2;
        private readonly TaskCompletionSource<bool> _acked = new(TaskCreationOptions.RunContinuationsAsynchronously);
        private int _outstanding;
        private int _possible;
        private int _acks;
        private bool _sealed;

        public Task<bool> Acked => _acked.Task;

        public void Add(bool counted)
        {
            lock (this)
            {
                _outstanding++;
                if (counted)
                {
                    _possible++;
                }
            }
        }

        /// <summary>No more replicas will be added: decide now if two can no longer succeed.</summary>
        public void Seal()
        {
            lock (this)
            {
                _sealed = true;
                Evaluate();
            }
        }

        public void Done(bool counted, bool ok)
        {
            lock (this)
            {
                _outstanding--;
                if (counted && ok)
                {
                    _acks++;
                }
                else if (counted)
                {
                    _possible--;
                }
                Evaluate();
            }
        }

        private void Evaluate()
        {
            if (!_sealed)
            {
                return;
            }
            if (_acks >= Quorum)
            {
                _acked.TrySetResult(true);
            }
            else if (_possible < Quorum)
            {
                _acked.TrySetResult(false);
            }
            if (_outstanding == 0 && data is not null)
            {
                ArrayPool<byte>.Shared.Return(data);
                ArrayPool<byte>.Shared.Return(hashes!);
                data = null;
            }
        }
    }
}
