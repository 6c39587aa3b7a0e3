using System.Buffers;
using System.Buffers.Binary;
using System.Globalization;
using System.Runtime.CompilerServices;
using Microsoft.Extensions.Logging;
using NbdServer.Common.Volumes;

using NbdServer.Protocol;

namespace NbdServer.ReplicaEngine;

/// <summary>
/// The upstairs as the frontend sees it: a block volume kept on three downstairs. Guest operations
/// are cut into jobs here (on the guest's thread: copying and hashing run in parallel with the
/// loop) and posted to the <see cref="Engine"/> loop, which owns every piece of state; the loop
/// completes them inline. Data path: frontend → <see cref="Engine"/> → downstairs client.
/// </summary>
/// <remarks>
/// Which extents a returning replica must copy is decided from metadata, not from a replay log: the
/// engine knows, per extent, the (generation, flush number) every in-service replica recorded at the
/// last flush, and which extents were written since. A replica whose extent disagrees, is dirty, or
/// was written since the last flush gets that extent copied from a healthy replica.
/// </remarks>
public sealed class ReplicatedVolume : IBlockVolume
{
    private const int MaxReadAttempts = 3;

    /// <summary>Source of every WRITE_ZEROES piece: never written, so one copy serves all requests.</summary>
    private static readonly ReadOnlyMemory<byte> SharedZeroes = new byte[4 << 20];

    private readonly Engine _engine;
    private readonly IDownstairsConnector _connector;
    private readonly CancellationTokenSource _stopping = new();
    private readonly List<Task> _workers = [];
    private readonly Scrubber _scrubber;
    private readonly Guid _upstairsId = Guid.NewGuid();
    private readonly Guid _sessionId = Guid.NewGuid();
    private StartupStatus? _startup = new("probing", 0, 0, 0);
    private int _blockSize;
    private int _maxIoBytes;

    private ReplicatedVolume(EngineOptions options, ILogger logger, IDownstairsConnector connector, TimeProvider time)
    {
        options.Validate();
        _engine = new Engine(options, logger, time);
        _connector = connector;
        _scrubber = new Scrubber(this, _engine);
    }

    internal Engine Engine => _engine;

    internal CancellationToken Stopping => _stopping.Token;

    public ulong Generation => _engine.Generation;

    public long Size => _engine.Size;

    public VolumeFeatures Features =>
        VolumeFeatures.Flush | VolumeFeatures.ForceUnitAccess | VolumeFeatures.Trim | VolumeFeatures.WriteZeroes
        | VolumeFeatures.MultiConnection | VolumeFeatures.Cache;

    /// <summary>Any byte range works (partial blocks are read-modify-written), but whole blocks avoid that.</summary>
    public int MinimumBlockSize => 1;

    public int PreferredBlockSize => _blockSize;

    public int BlockSize => _blockSize;

    public int ExtentCount => _engine.ExtentCount;

    /// <summary>Connects to the three downstairs, fences older upstairs, reconciles, and returns a volume ready for the guest.</summary>
    public static Task<ReplicatedVolume> StartAsync(EngineOptions options, ILogger logger, CancellationToken cancellationToken) =>
        StartAsync(options, logger, TcpDownstairsConnector.Create(options), cancellationToken);

    /// <param name="created">Called with the volume before it activates, e.g. to serve its status (<see cref="EngineStatus.Startup"/>) during a long reconciliation.</param>
    public static Task<ReplicatedVolume> StartAsync(EngineOptions options, ILogger logger, Action<ReplicatedVolume>? created, CancellationToken cancellationToken) =>
        StartAsync(options, logger, TcpDownstairsConnector.Create(options), cancellationToken, created);

    internal static async Task<ReplicatedVolume> StartAsync(EngineOptions options, ILogger logger, IDownstairsConnector connector, CancellationToken cancellationToken,
        Action<ReplicatedVolume>? created = null, TimeProvider? time = null)
    {
        var volume = new ReplicatedVolume(options, logger, connector, time ?? TimeProvider.System);
        try
        {
            created?.Invoke(volume);
            await new Activation(volume._engine, connector, volume.Hello, s => volume._startup = s).RunAsync(volume._stopping.Token, cancellationToken);
            volume._blockSize = volume._engine.BlockSize;
            volume._maxIoBytes = volume._engine.MaxIoBytes;
            volume._startup = null;
            volume.StartWorkers();
        }
        catch
        {
            await volume.DisposeAsync();
            throw;
        }
        return volume;
    }

    internal HelloRequest Hello(Guid regionId, bool readOnly = false) =>
        new(Wire.ProtocolVersion, readOnly, regionId, _upstairsId, _sessionId, readOnly ? 0 : _engine.Generation);

    private void StartWorkers()
    {
        foreach (Replica replica in _engine.Replicas)
        {
            var maintainer = new ReplicaMaintainer(_engine, _connector, replica, this);
            _workers.Add(Task.Run(() => maintainer.RunAsync(_stopping.Token)));
        }
        if (_engine.Options.ScrubInterval > TimeSpan.Zero)
        {
            _workers.Add(Task.Run(() => _scrubber.RunPeriodicallyAsync(_stopping.Token)));
        }
    }

    // ------------------------------------------------------------------ guest operations

    [AsyncMethodBuilder(typeof(PoolingAsyncValueTaskMethodBuilder))]
    public async ValueTask ReadAsync(long offset, Memory<byte> destination, CancellationToken cancellationToken)
    {
        _engine.LastGuestIo = _engine.Time.GetTimestamp();
        if (destination.IsEmpty)
        {
            return;
        }
        long firstBlock = offset / _blockSize;
        long endBlock = (offset + destination.Length + _blockSize - 1) / _blockSize;
        int lead = (int)(offset % _blockSize);
        if (lead == 0 && destination.Length % _blockSize == 0)
        {
            await ReadBlocksAsync(firstBlock, destination);
            return;
        }
        int bytes = checked((int)((endBlock - firstBlock) * _blockSize));
        byte[] buffer = ArrayPool<byte>.Shared.Rent(bytes);
        try
        {
            await ReadBlocksAsync(firstBlock, buffer.AsMemory(0, bytes));
            buffer.AsSpan(lead, destination.Length).CopyTo(destination.Span);
        }
        finally
        {
            ArrayPool<byte>.Shared.Return(buffer);
        }
    }

    [AsyncMethodBuilder(typeof(PoolingAsyncValueTaskMethodBuilder))]
    public async ValueTask WriteAsync(long offset, ReadOnlyMemory<byte> source, WriteOptions options, CancellationToken cancellationToken)
    {
        _engine.LastGuestIo = _engine.Time.GetTimestamp();
        if (!source.IsEmpty)
        {
            await WriteRangeAsync(offset, source);
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
        // The pieces all come from one read-only buffer of zeroes shared by every request.
        int piece = Math.Min(_maxIoBytes, SharedZeroes.Length);
        for (long done = 0; done < length; done += piece)
        {
            int count = (int)Math.Min(piece, length - done);
            await WriteRangeAsync(offset + done, SharedZeroes[..count]);
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

    [AsyncMethodBuilder(typeof(PoolingAsyncValueTaskMethodBuilder))]
    public async ValueTask FlushAsync(CancellationToken cancellationToken)
    {
        Job job = JobPool.Rent();
        job.Kind = JobKind.Flush;
        JobOutcome outcome = await Run(job);
        if (!outcome.Ok)
        {
            throw new VolumeException(VolumeError.IoError, outcome.Result.Message is { } why && !outcome.Result.IsOk && outcome.Replica < 0
                ? why
                : $"a flush could not be made durable on two replicas ({_engine.Query(() => _engine.InServiceCount)} in service)");
        }
    }

    private ValueTask<JobOutcome> Run(Job job)
    {
        JobCompletion completion = JobCompletion.Rent();
        job.Completion = completion;
        ValueTask<JobOutcome> task = completion.Task;
        _engine.Post(job);
        return task;
    }

    // ------------------------------------------------------------------ writes

    [AsyncMethodBuilder(typeof(PoolingAsyncValueTaskMethodBuilder))]
    private async ValueTask WriteRangeAsync(long offset, ReadOnlyMemory<byte> source)
    {
        int lead = (int)(offset % _blockSize);
        int tail = (int)((offset + source.Length) % _blockSize);
        long firstBlock = offset / _blockSize;
        if (lead == 0 && tail == 0)
        {
            for (int done = 0; done < source.Length; done += _maxIoBytes)
            {
                int count = Math.Min(_maxIoBytes, source.Length - done);
                await WriteBlocksAsync(firstBlock + (done / _blockSize), source.Slice(done, count), holdsRangeLock: false);
            }
            return;
        }
        await ReadModifyWriteAsync(offset, source);
    }

    /// <summary>
    /// Partial blocks: read-modify-write under a range lock, so no other write to these blocks is
    /// dispatched between our read and our write (it would be silently undone). Its own method: the
    /// lock's closures would otherwise be allocated on every whole-block write too.
    /// </summary>
    private async ValueTask ReadModifyWriteAsync(long offset, ReadOnlyMemory<byte> source)
    {
        int lead = (int)(offset % _blockSize);
        int tail = (int)((offset + source.Length) % _blockSize);
        long firstBlock = offset / _blockSize;
        long endBlock = (offset + source.Length + _blockSize - 1) / _blockSize;
        int bytes = checked((int)((endBlock - firstBlock) * _blockSize));
        byte[] buffer = ArrayPool<byte>.Shared.Rent(bytes);
        var lease = new RangeLease(firstBlock, endBlock);
        await _engine.InvokeAsync(() => _engine.RangeLocks.Take(lease));
        await lease.Granted.Task;
        try
        {
            if (lead != 0)
            {
                await ReadBlocksAsync(firstBlock, buffer.AsMemory(0, _blockSize));
            }
            if (tail != 0 && (endBlock - 1 > firstBlock || lead == 0))
            {
                await ReadBlocksAsync(endBlock - 1, buffer.AsMemory(bytes - _blockSize, _blockSize));
            }
            source.CopyTo(buffer.AsMemory(lead));
            for (int done = 0; done < bytes; done += _maxIoBytes)
            {
                int count = Math.Min(_maxIoBytes, bytes - done);
                await WriteBlocksAsync(firstBlock + (done / _blockSize), buffer.AsMemory(done, count), holdsRangeLock: true);
            }
        }
        finally
        {
            await _engine.InvokeAsync(() => _engine.RangeLocks.Release(lease));
            ArrayPool<byte>.Shared.Return(buffer);
        }
    }

    /// <summary>One write job of whole blocks: copied into a buffer the job owns (the guest's is recycled at the ack, the third replica may still be sending), hashed, posted.</summary>
    [AsyncMethodBuilder(typeof(PoolingAsyncValueTaskMethodBuilder))]
    internal async ValueTask WriteBlocksAsync(long firstBlock, ReadOnlyMemory<byte> data, bool holdsRangeLock)
    {
        int blocks = data.Length / _blockSize;
        Job job = JobPool.Rent();
        job.Kind = JobKind.Write;
        job.FirstBlock = firstBlock;
        job.Blocks = blocks;
        job.Bytes = data.Length;
        job.HoldsRangeLock = holdsRangeLock;
        job.OwnedData = ArrayPool<byte>.Shared.Rent(data.Length);
        job.OwnedHashes = ArrayPool<byte>.Shared.Rent(blocks * Wire.HashSize);
        data.CopyTo(job.OwnedData);
        BlockContext.HashBlocks(job.OwnedData.AsSpan(0, data.Length), _blockSize, job.OwnedHashes.AsSpan(0, blocks * Wire.HashSize));
        job.Payload = job.OwnedData.AsMemory(0, data.Length);
        job.PayloadHashes = job.OwnedHashes.AsMemory(0, blocks * Wire.HashSize);
        JobOutcome outcome = await Run(job);
        if (!outcome.Ok)
        {
            throw new VolumeException(VolumeError.IoError, outcome.Replica < 0 && !outcome.Result.IsOk
                ? outcome.Result.Message ?? outcome.Result.ToString()
                : $"write of blocks {firstBlock}+{blocks} could not be made safe on two replicas ({_engine.Query(() => _engine.InServiceCount)} in service)");
        }
    }

    // ------------------------------------------------------------------ reads

    [AsyncMethodBuilder(typeof(PoolingAsyncValueTaskMethodBuilder))]
    private async ValueTask ReadBlocksAsync(long firstBlock, Memory<byte> destination)
    {
        for (int done = 0; done < destination.Length; done += _maxIoBytes)
        {
            int count = Math.Min(_maxIoBytes, destination.Length - done);
            await ReadChunkAsync(firstBlock + (done / _blockSize), destination.Slice(done, count));
        }
    }

    /// <summary>
    /// Reads from one replica in service and checks every block against its stored hash. A bad block
    /// or an error sends the read to another replica; the bad copy is then repaired from the good one.
    /// </summary>
    [AsyncMethodBuilder(typeof(PoolingAsyncValueTaskMethodBuilder))]
    private async ValueTask ReadChunkAsync(long firstBlock, Memory<byte> destination)
    {
        int blocks = destination.Length / _blockSize;
        int tried = 0;
        List<(int Replica, string Problem, bool Repairable)>? bad = null;
        for (int attempt = 0; attempt < MaxReadAttempts; attempt++)
        {
            JobOutcome read = await ReadOnceAsync(firstBlock, destination.Length, tried);
            if (read.Replica < 0)
            {
                // No replica left to ask.
                throw new VolumeException(VolumeError.IoError, Describe(firstBlock, blocks, bad, read.Result.Message));
            }
            tried |= 1 << read.Replica;
            string? problem;
            bool repairable;
            if (read.Ok)
            {
                int badBlock = FirstBadBlock(read.Data!, read.Hashes!, blocks);
                if (badBlock < 0)
                {
                    read.Data.AsSpan(0, destination.Length).CopyTo(destination.Span);
                    read.ReturnBuffers();
                    if (bad is not null)
                    {
                        await RepairBadCopiesAsync(firstBlock, blocks, bad, read.Replica);
                    }
                    return;
                }
                read.ReturnBuffers();
                await CountErrorAsync(read.Replica);
                problem = $"block {firstBlock + badBlock} does not match its stored hash";
                repairable = true;
            }
            else
            {
                // An error answer (EIO on a bad sector) is worth a rewrite; a lost connection or a timeout is the fault path's business.
                problem = read.Result.Message ?? read.Result.ToString();
                repairable = !read.TimedOut && !read.ConnectionLost;
                if (!read.TimedOut && !read.ConnectionLost)
                {
                    problem = read.Result.ToString();
                }
            }
            (bad ??= []).Add((read.Replica, problem, repairable));
        }
        throw new VolumeException(VolumeError.IoError, Describe(firstBlock, blocks, bad, null));
    }

    private Task CountErrorAsync(int replica) => _engine.InvokeAsync(() => _engine.Replicas[replica].CountError());

    private static string Describe(long firstBlock, int blocks, List<(int Replica, string Problem, bool Repairable)>? bad, string? last) =>
        bad is null
            ? last ?? $"no replica in service can serve the read of blocks {firstBlock}+{blocks}"
            : $"read of blocks {firstBlock}+{blocks} failed on every replica: {string.Join("; ", bad.Select(b => $"replica {b.Replica}: {b.Problem}"))}";

    private int FirstBadBlock(byte[] data, byte[] hashes, int blocks)
    {
        for (int i = 0; i < blocks; i++)
        {
            ulong hash = BinaryPrimitives.ReadUInt64LittleEndian(hashes.AsSpan(i * Wire.HashSize));
            if (!BlockContext.Verify(data.AsSpan(i * _blockSize, _blockSize), hash))
            {
                return i;
            }
        }
        return -1;
    }

    /// <summary>
    /// One read from the least-loaded replica in service not in <paramref name="exclude"/>, into
    /// buffers the engine owns (handed over on success): a read that times out on a stalled replica
    /// may still complete later, and must never land in a guest buffer that has since been reused.
    /// </summary>
    internal ValueTask<JobOutcome> ReadOnceAsync(long firstBlock, int length, int exclude)
    {
        int blocks = length / _blockSize;
        Job job = JobPool.Rent();
        job.Kind = JobKind.Read;
        job.FirstBlock = firstBlock;
        job.Blocks = blocks;
        job.Bytes = length;
        job.Exclude = exclude;
        job.OwnedData = ArrayPool<byte>.Shared.Rent(length);
        job.OwnedHashes = ArrayPool<byte>.Shared.Rent(blocks * Wire.HashSize);
        job.Destination = job.OwnedData.AsMemory(0, length);
        job.DestinationHashes = job.OwnedHashes.AsMemory(0, blocks * Wire.HashSize);
        return Run(job);
    }

    private async Task RepairBadCopiesAsync(long firstBlock, int blocks, List<(int Replica, string Problem, bool Repairable)> bad, int good)
    {
        foreach ((int replica, string problem, bool repairable) in bad)
        {
            if (repairable)
            {
                EngineLog.ReadRepaired(_engine.Logger, firstBlock, blocks, replica, problem, good);
                await RepairBlocksAsync(replica, good, firstBlock, blocks);
            }
        }
    }

    /// <summary>
    /// Rewrites blocks on every replica taking writes from a replica that returned them good. Under
    /// a range lock and with a fresh read, so a guest write racing the repair is never undone; the
    /// write is an ordinary write job owning its copy, so no buffer is reused while a sender may
    /// still read it. Written to all (not only the bad copy): the extent turns dirty on all of them
    /// and the next flush gives all the same (generation, flush number).
    /// </summary>
    internal async Task<bool> RepairBlocksAsync(int target, int source, long firstBlock, int blocks)
    {
        try
        {
            var lease = new RangeLease(firstBlock, firstBlock + blocks);
            // Never wait: the read being repaired may itself run under a range lock (read-modify-write),
            // and waiting for our own lock would deadlock. A busy range is repaired by a later read.
            if (!await _engine.InvokeAsync(() => _engine.RangeLocks.TryTake(lease) && _engine.Replicas[target].ReceivesWrites))
            {
                await _engine.InvokeAsync(() => _engine.RangeLocks.Release(lease));
                return false;
            }
            try
            {
                JobOutcome read = await ReadOnceAsync(firstBlock, blocks * _blockSize, ~(1 << source));
                try
                {
                    if (!read.Ok || FirstBadBlock(read.Data!, read.Hashes!, blocks) >= 0)
                    {
                        return false;
                    }
                    // The read handed back the *stored* hashes, where 0 means "never written"; a write
                    // carries the hash of its data, so it is recomputed by the write path.
                    await WriteBlocksAsync(firstBlock, read.Data.AsMemory(0, blocks * _blockSize), holdsRangeLock: true);
                    return true;
                }
                finally
                {
                    read.ReturnBuffers();
                }
            }
            finally
            {
                await _engine.InvokeAsync(() => _engine.RangeLocks.Release(lease));
            }
        }
        catch (VolumeException)
        {
            return false; // a replica failed meanwhile: the fault path has it
        }
    }

    // ------------------------------------------------------------------ status, scrub, shutdown

    /// <summary>A snapshot for `nbd-server status` and the control endpoint.</summary>
    public EngineStatus GetStatus() => _engine.Query(() =>
        new EngineStatus(_engine.Generation, _engine.FlushNumber, _engine.Size, _engine.BlockSize, _engine.ExtentCount, _engine.InServiceCount, _engine.ReplicaStatuses())
        {
            Scrub = _scrubber.Status,
            Startup = _startup,
            RepairRateLimit = _engine.Pace.RateLimit,
            RepairDutyCycle = _engine.Pace.DutyCycle,
        });

    public ScrubStatus Scrub => _scrubber.Status;

    /// <summary>Block copies every scrub since start checked and repaired.</summary>
    public (long Checked, long Repaired) ScrubTotals => _scrubber.Totals;

    /// <summary>
    /// The operator's live change of the repair pace (null: that part unchanged); the running
    /// repair's copies read it at their next chunk. Answers why a value was refused, or null.
    /// </summary>
    public string? SetRepairPace(double? rateLimit, double? dutyCycle)
    {
        if (_engine.Pace.TrySet(rateLimit, dutyCycle) is { } refusal)
        {
            return refusal;
        }
        double rate = _engine.Pace.RateLimit;
        EngineLog.RepairPaceSet(_engine.Logger, rate > 0 ? string.Create(CultureInfo.InvariantCulture, $"{rate:0.#} MiB/s per replica") : "no rate limit", _engine.Pace.DutyCycle);
        return null;
    }

    /// <summary>Starts a scrub unless one is running (see <see cref="Scrubber"/>).</summary>
    public Task StartScrub() => _startup is not null ? Task.CompletedTask : _scrubber.Start(_stopping.Token);

    /// <summary>
    /// At a stop (a reload does not wait: its new image repairs again), once the guest is gone: a
    /// live repair in progress gets <see cref="EngineOptions.StopRepairGrace"/> to finish, so the
    /// replicas are left identical when it can (see the option for why either outcome is safe).
    /// </summary>
    public async Task FinishRepairsAsync(CancellationToken cancellationToken)
    {
        TimeSpan grace = _engine.Options.StopRepairGrace;
        if (_startup is not null || _stopping.IsCancellationRequested)
        {
            return;
        }
        long started = _engine.Time.GetTimestamp();
        bool said = false;
        while (true)
        {
            (int Index, int Done, int Total)[] repairing = await _engine.InvokeAsync(() =>
                _engine.Replicas.Where(r => r.State == ReplicaState.Repairing).Select(r => (r.Index, r.RepairDone, r.RepairTotal)).ToArray());
            if (repairing.Length == 0)
            {
                return;
            }
            if (_engine.Time.GetElapsedTime(started) >= grace || cancellationToken.IsCancellationRequested)
            {
                foreach ((int index, int done, int total) in repairing)
                {
                    EngineLog.LeftMidRepair(_engine.Logger, index, total - done, total);
                }
                return;
            }
            if (!said)
            {
                said = true;
                foreach ((int index, int done, int total) in repairing)
                {
                    EngineLog.StopWaitsForRepair(_engine.Logger, index, total - done, total, grace.TotalSeconds);
                }
            }
            await Task.Delay(StopRepairPoll, _engine.Time, CancellationToken.None);
        }
    }

    /// <summary>How often <see cref="FinishRepairsAsync"/> looks whether the repairs are done.</summary>
    private static readonly TimeSpan StopRepairPoll = TimeSpan.FromMilliseconds(50);

    public async ValueTask DisposeAsync()
    {
        if (_stopping.IsCancellationRequested)
        {
            return;
        }
        await _stopping.CancelAsync();
        foreach (SemaphoreSlim wake in _engine.Reconnect)
        {
            _engine.RequestConnection(Array.IndexOf(_engine.Reconnect, wake));
        }
        await Task.WhenAll(_workers).WaitAsync(TimeSpan.FromSeconds(5)).ContinueWith(static _ => { }, TaskScheduler.Default);
        List<ReplicaConnection> connections = await _engine.InvokeAsync(_engine.Stop);
        foreach (ReplicaConnection connection in connections)
        {
            await connection.Client.DisposeAsync();
        }
        _engine.Throttle.Dispose();
    }
}

/// <summary>Per-replica figures an operator watches during an incident.</summary>
public sealed record ReplicaStatus(int Index, string EndPoint, ReplicaState State, int OutstandingJobs, long OutstandingBytes,
    long Completed, double CompletedPerSecond, long Errors, long Faults, string? LastFault, int RepairDone, int RepairTotal)
{
    /// <summary>The running repair: bytes copied so far and (estimated) in all.</summary>
    public long RepairBytesDone { get; init; }

    public long RepairBytesTotal { get; init; }

    /// <summary>Bytes per second the running repair has achieved, and the seconds left at that rate (null: not known yet).</summary>
    public double? RepairBytesPerSecond { get; init; }

    public double? RepairSecondsLeft { get; init; }

    /// <summary>"changed-blocks" or "extents" while repairing; null otherwise.</summary>
    public string? RepairMode { get; init; }

    /// <summary>Bytes its changed-block record marks (null: it has no record; its next repair compares extents).</summary>
    public long? ChangeRecordBytes { get; init; }

    /// <summary>Since startup: bytes repairs copied to this replica and seconds spent repairing it.</summary>
    public long RepairBytesCopied { get; init; }

    public double RepairSeconds { get; init; }
}

public sealed record EngineStatus(ulong Generation, ulong FlushNumber, long Size, int BlockSize, int ExtentCount, int InService, ReplicaStatus[] Replicas)
{
    /// <summary>The repair pace in force: MiB/s per replica (0: no limit) and the duty cycle while the guest does IO.</summary>
    public double RepairRateLimit { get; init; }

    public double RepairDutyCycle { get; init; }

    public ScrubStatus? Scrub { get; init; }

    /// <summary>Set until the volume serves: what startup is doing (a long reconciliation shows its progress here).</summary>
    public StartupStatus? Startup { get; init; }
}

/// <summary>Startup before the volume serves: "probing" the replicas, then "reconciling" extent by extent.</summary>
public sealed record StartupStatus(string Phase, int ExtentsDone, int ExtentTotal, int ExtentsRepaired);
