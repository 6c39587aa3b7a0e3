using System.Buffers.Binary;
using NbdServer.Protocol;

namespace NbdServer.ReplicaEngine.Tests;

internal enum OpKind
{
    Write,
    Read,
    Flush,
    ExtentRead,
    ExtentWrite,
    ExtentCommit,
    MarkPending,
}

/// <summary>One request as a fake downstairs received it (at the moment the engine called the method).</summary>
internal sealed record ReceivedOp(int Connection, OpKind Kind, ulong JobId, long FirstBlock, int BlockCount, ulong FlushNumber);

/// <summary>
/// The bytes of one write as they were when the fake applied it: the moment a real client would have
/// copied them onto the wire (it sends straight from the caller's buffer, no copy at submission).
/// </summary>
internal sealed record WritePayload(ulong JobId, long FirstBlock, byte[] Data, bool HashesMatched);

/// <summary>
/// The storage and the script of one replica. It outlives connections (a reconnect finds the same
/// blocks and metadata), keeps blocks, 16-byte contexts (hash, write id) and per-extent
/// (generation, flush, dirty) like a real region, and can be told to hold, fail, drop or refuse.
/// </summary>
internal sealed class FakeReplica
{
    private readonly byte[] _data;
    private readonly byte[] _contexts;
    private readonly ExtentMeta[] _meta;
    private readonly (byte[] Data, byte[] Contexts)?[] _staging;
    private readonly bool[] _repairPending;
    private readonly List<ReceivedOp> _received = [];
    private readonly List<(OpKind Kind, ulong JobId)> _replied = [];
    private readonly List<WritePayload> _payloads = [];
    private readonly List<HelloRequest> _hellos = [];
    private HashSet<OpKind> _held = [];
    private bool _repliesHeld;
    private TaskCompletionSource _released = new(TaskCreationOptions.RunContinuationsAsynchronously);
    private int _connections;

    public FakeReplica(int index, int blockSize, int extentBlocks, int extentCount)
    {
        Index = index;
        BlockSize = blockSize;
        ExtentBlocks = extentBlocks;
        ExtentCount = extentCount;
        _data = new byte[(long)blockSize * extentBlocks * extentCount];
        _contexts = new byte[extentBlocks * extentCount * BlockContext.Size];
        _meta = new ExtentMeta[extentCount];
        _staging = new (byte[], byte[])?[extentCount];
        _repairPending = new bool[extentCount];
    }

    /// <summary>Every mutation and every record happens under this lock.</summary>
    public Lock Sync { get; } = new();

    public int Index { get; }

    public int BlockSize { get; }

    public int ExtentBlocks { get; }

    public int ExtentCount { get; }

    public long BlockCount => (long)ExtentBlocks * ExtentCount;

    public Guid RegionId { get; } = Guid.NewGuid();

    public ulong HighestGeneration { get; set; }

    /// <summary>Like the downstairs' --max-generation-step: a writer's Hello may raise the generation by at most this.</summary>
    public ulong MaxGenerationStep { get; set; } = Wire.DefaultMaxGenerationStep;

    /// <summary>Like the downstairs' --max-flush-step: a flush or commit may lie at most this above the highest recorded flush number.</summary>
    public ulong MaxFlushStep { get; set; } = Wire.DefaultMaxFlushStep;

    /// <summary>A lying source: extent reads report this metadata instead of the stored one.</summary>
    public ExtentMeta? ExtentReadMetaLie { get; set; }

    /// <summary>False: connection attempts fail (the process is down or the network is cut).</summary>
    public bool Reachable { get; set; } = true;

    /// <summary>Answer writes with this code (nothing is applied).</summary>
    public ResultCode? FailWritesWith { get; set; }

    /// <summary>Answer flushes with this code (nothing is stamped).</summary>
    public ResultCode? FailFlushesWith { get; set; }

    /// <summary>Time each request takes once it may run (a slow disk).</summary>
    public TimeSpan OpDelay { get; set; }

    /// <summary>
    /// Like a real <c>DownstairsClient</c> once a request is queued for sending: the caller's token no
    /// longer ends it (only its reply or the connection does). Off, the token ends a request still
    /// waiting at the gate, as a real client's token ends a wait for a send slot.
    /// </summary>
    public bool IgnoreCancellation { get; set; }

    /// <summary>Keep a copy of every write's bytes as applied (<see cref="WritePayloads"/>).</summary>
    public bool RecordWritePayloads { get; set; }

    public IReadOnlyList<WritePayload> WritePayloads
    {
        get
        {
            lock (Sync)
            {
                return [.. _payloads];
            }
        }
    }

    /// <summary>The read-write connection most recently opened.</summary>
    public FakeDownstairs? Current { get; private set; }

    public IReadOnlyList<ReceivedOp> Received
    {
        get
        {
            lock (Sync)
            {
                return [.. _received];
            }
        }
    }

    /// <summary>Replies handed to the engine (posted to its loop), in the order they were handed over.</summary>
    public IReadOnlyList<(OpKind Kind, ulong JobId)> Replied
    {
        get
        {
            lock (Sync)
            {
                return [.. _replied];
            }
        }
    }

    public IReadOnlyList<HelloRequest> Hellos
    {
        get
        {
            lock (Sync)
            {
                return [.. _hellos];
            }
        }
    }

    public void ClearReceived()
    {
        lock (Sync)
        {
            _received.Clear();
            _replied.Clear();
        }
    }

    // ------------------------------------------------------------ script

    /// <summary>Requests of these kinds (all kinds if none given) wait at the gate until <see cref="Release"/>.</summary>
    public void Hold(params OpKind[] kinds)
    {
        lock (Sync)
        {
            _held = kinds.Length == 0 ? [.. Enum.GetValues<OpKind>()] : [.. kinds];
        }
    }

    public void Release()
    {
        TaskCompletionSource released;
        lock (Sync)
        {
            _held = [];
            _repliesHeld = false;
            released = _released;
            _released = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
        }
        released.TrySetResult();
    }

    /// <summary>
    /// Requests are still applied (in order) but their replies wait until <see cref="Release"/>: the
    /// downstairs did the work and the answers are in flight, so the upstairs cannot yet react to them.
    /// </summary>
    public void HoldReplies()
    {
        lock (Sync)
        {
            _repliesHeld = true;
        }
    }

    internal async Task WaitForReplyGateAsync(CancellationToken cancellationToken)
    {
        while (true)
        {
            Task released;
            lock (Sync)
            {
                if (!_repliesHeld)
                {
                    return;
                }
                released = _released.Task;
            }
            await released.WaitAsync(cancellationToken);
        }
    }

    /// <summary>Cuts the current connection: every request pending on it fails, later ones fail at once.</summary>
    public void DropConnection() => Current?.Close("connection reset by peer");

    /// <summary>Flips bits of a stored block without touching its stored hash (bit rot).</summary>
    public void CorruptBlock(long block)
    {
        lock (Sync)
        {
            _data[(block * BlockSize) + 7] ^= 0x5A;
        }
    }

    /// <summary>Writes a whole extent directly (blocks filled by <paramref name="fill"/>, hashes valid) and sets its metadata.</summary>
    public void SetExtent(int extent, byte fill, ExtentMeta meta)
    {
        lock (Sync)
        {
            for (int b = 0; b < ExtentBlocks; b++)
            {
                long block = ((long)extent * ExtentBlocks) + b;
                Span<byte> data = _data.AsSpan((int)(block * BlockSize), BlockSize);
                data.Fill(fill);
                data[0] = (byte)b;
                SetContext(block, BlockContext.Hash(data), 0);
            }
            _meta[extent] = meta;
            // Like a real region: its highest generation covers every extent's (computed at open).
            HighestGeneration = Math.Max(HighestGeneration, meta.Generation);
        }
    }

    public byte[] ReadBlock(long block)
    {
        lock (Sync)
        {
            return _data.AsSpan((int)(block * BlockSize), BlockSize).ToArray();
        }
    }

    public ExtentMeta Meta(int extent)
    {
        lock (Sync)
        {
            return _meta[extent];
        }
    }

    /// <summary>Everything that must match between replicas: blocks, stored hashes, extent metadata.</summary>
    public (byte[] Data, ulong[] Hashes, ExtentMeta[] Meta) Snapshot()
    {
        lock (Sync)
        {
            ulong[] hashes = new ulong[BlockCount];
            for (long b = 0; b < BlockCount; b++)
            {
                hashes[b] = StoredHash(b);
            }
            return (_data.ToArray(), hashes, _meta.ToArray());
        }
    }

    // ------------------------------------------------------------ connections

    public async Task<IDownstairs> ConnectAsync(HelloRequest hello, IDownstairsReplyHandler replies, CancellationToken cancellationToken)
    {
        await Task.Yield();
        cancellationToken.ThrowIfCancellationRequested();
        lock (Sync)
        {
            _hellos.Add(hello);
            if (!Reachable)
            {
                throw new DownstairsConnectionException($"replica {Index}: connection refused");
            }
            if (hello.RegionId != Guid.Empty && hello.RegionId != RegionId)
            {
                throw new DownstairsRefusedException(new DownstairsResult(ResultCode.WrongRegion, 0, "another region"));
            }
            if (!hello.ReadOnly)
            {
                if (hello.Generation < HighestGeneration)
                {
                    throw new DownstairsRefusedException(new DownstairsResult(ResultCode.Fenced, 0, $"generation {hello.Generation} < {HighestGeneration}"));
                }
                if (hello.Generation is 0 or > Wire.MaxGeneration || hello.Generation - HighestGeneration > MaxGenerationStep)
                {
                    throw new DownstairsRefusedException(new DownstairsResult(ResultCode.Invalid, 0, $"generation {hello.Generation} is beyond the step from {HighestGeneration}"));
                }
                HighestGeneration = hello.Generation;
            }
            var reply = new HelloReply(Wire.ProtocolVersion, hello.ReadOnly, RegionId, BlockSize, ExtentBlocks, ExtentCount,
                Wire.DefaultMaxFrameBytes, 1024, HighestGeneration, [.. _meta]);
            var connection = new FakeDownstairs(this, ++_connections, reply, hello.ReadOnly ? 0 : hello.Generation, replies);
            if (!hello.ReadOnly)
            {
                Current = connection;
                Array.Clear(_repairPending); // like the real downstairs: marks belong to the writer that set them
            }
            return connection;
        }
    }

    internal void Record(ReceivedOp op) => _received.Add(op);

    internal void RecordReply(OpKind kind, ulong jobId)
    {
        lock (Sync)
        {
            _replied.Add((kind, jobId));
        }
    }

    internal async Task WaitAtGateAsync(OpKind kind, CancellationToken cancellationToken)
    {
        while (true)
        {
            Task released;
            lock (Sync)
            {
                if (!_held.Contains(kind))
                {
                    return;
                }
                released = _released.Task;
            }
            await released.WaitAsync(cancellationToken);
        }
    }

    // ------------------------------------------------------------ storage (callers hold Sync)

    internal DownstairsResult ApplyWrite(long firstBlock, ReadOnlySpan<byte> data, ReadOnlySpan<byte> hashes, ulong jobId)
    {
        int count = data.Length / BlockSize;
        if (firstBlock < 0 || firstBlock + count > BlockCount)
        {
            return new DownstairsResult(ResultCode.OutOfRange);
        }
        bool matched = true;
        for (int i = 0; i < count; i++)
        {
            matched &= BlockContext.Hash(data.Slice(i * BlockSize, BlockSize)) == BinaryPrimitives.ReadUInt64LittleEndian(hashes[(i * 8)..]);
        }
        if (RecordWritePayloads)
        {
            _payloads.Add(new WritePayload(jobId, firstBlock, data.ToArray(), matched));
        }
        if (FailWritesWith is { } code)
        {
            return new DownstairsResult(code, code == ResultCode.NoSpace ? 28 : 5, "injected");
        }
        if (!matched)
        {
            return new DownstairsResult(ResultCode.HashMismatch);
        }
        for (int i = 0; i < count; i++)
        {
            long block = firstBlock + i;
            data.Slice(i * BlockSize, BlockSize).CopyTo(_data.AsSpan((int)(block * BlockSize)));
            SetContext(block, BinaryPrimitives.ReadUInt64LittleEndian(hashes[(i * 8)..]), jobId);
            int extent = (int)(block / ExtentBlocks);
            _meta[extent] = _meta[extent] with { Dirty = true };
        }
        return DownstairsResult.Ok;
    }

    internal DownstairsResult ApplyRead(long firstBlock, Span<byte> data, Span<byte> hashes)
    {
        int count = data.Length / BlockSize;
        if (firstBlock < 0 || firstBlock + count > BlockCount)
        {
            return new DownstairsResult(ResultCode.OutOfRange);
        }
        _data.AsSpan((int)(firstBlock * BlockSize), data.Length).CopyTo(data);
        for (int i = 0; i < count && !hashes.IsEmpty; i++)
        {
            BinaryPrimitives.WriteUInt64LittleEndian(hashes[(i * 8)..], StoredHash(firstBlock + i));
        }
        return DownstairsResult.Ok;
    }

    internal DownstairsResult ApplyFlush(ulong flushNumber, ulong generation)
    {
        if (FailFlushesWith is { } code)
        {
            return new DownstairsResult(code, code == ResultCode.NoSpace ? 28 : 5, "injected");
        }
        if (flushNumber is 0 or >= Wire.MaxFlushNumber || FlushBeyondStep(flushNumber))
        {
            return new DownstairsResult(ResultCode.Invalid, 0, $"flush number {flushNumber} refused");
        }
        for (int e = 0; e < ExtentCount; e++)
        {
            if (_meta[e].Dirty && !_repairPending[e])
            {
                _meta[e] = new ExtentMeta(generation, flushNumber, false);
            }
        }
        return DownstairsResult.Ok;
    }

    internal ExtentReadResult ApplyExtentRead(ExtentRange range, Span<byte> contexts, Span<byte> data)
    {
        long first = ((long)range.Extent * ExtentBlocks) + range.FirstBlock;
        _data.AsSpan((int)(first * BlockSize), range.BlockCount * BlockSize).CopyTo(data);
        _contexts.AsSpan((int)(first * BlockContext.Size), range.BlockCount * BlockContext.Size).CopyTo(contexts);
        return new ExtentReadResult(DownstairsResult.Ok, ExtentReadMetaLie ?? _meta[range.Extent]);
    }

    private bool FlushBeyondStep(ulong flushNumber)
    {
        ulong recorded = _meta.Max(m => m.FlushNumber);
        return flushNumber > recorded && flushNumber - recorded > MaxFlushStep;
    }

    internal DownstairsResult ApplyExtentWrite(ExtentRange range, ReadOnlySpan<byte> contexts, ReadOnlySpan<byte> data)
    {
        if (range.InPlace)
        {
            // A catch-up copy: into the live extent, which is dirty from now until the in-place commit.
            long first = ((long)range.Extent * ExtentBlocks) + range.FirstBlock;
            data[..(range.BlockCount * BlockSize)].CopyTo(_data.AsSpan((int)(first * BlockSize)));
            contexts[..(range.BlockCount * BlockContext.Size)].CopyTo(_contexts.AsSpan((int)(first * BlockContext.Size)));
            _meta[range.Extent] = _meta[range.Extent] with { Dirty = true };
            InPlaceBlocksWritten += range.BlockCount;
            return DownstairsResult.Ok;
        }
        if ((range.Flags & ExtentRange.BeginFlag) != 0 || _staging[range.Extent] is null)
        {
            _staging[range.Extent] = (new byte[ExtentBlocks * BlockSize], new byte[ExtentBlocks * BlockContext.Size]);
        }
        (byte[] stagedData, byte[] stagedContexts) = _staging[range.Extent]!.Value;
        data[..(range.BlockCount * BlockSize)].CopyTo(stagedData.AsSpan(range.FirstBlock * BlockSize));
        contexts[..(range.BlockCount * BlockContext.Size)].CopyTo(stagedContexts.AsSpan(range.FirstBlock * BlockContext.Size));
        return DownstairsResult.Ok;
    }

    /// <summary>Blocks catch-up repairs wrote in place (not staged).</summary>
    public long InPlaceBlocksWritten { get; private set; }

    internal DownstairsResult ApplyExtentCommit(int extent, ExtentMeta meta, bool inPlace)
    {
        if (meta.FlushNumber >= Wire.MaxFlushNumber || FlushBeyondStep(meta.FlushNumber))
        {
            return new DownstairsResult(ResultCode.Invalid, 0, $"commit flush number {meta.FlushNumber} refused");
        }
        if (inPlace)
        {
            // The blocks were written in place with ordinary writes: only the record changes.
            _meta[extent] = meta;
            _repairPending[extent] = false;
            return DownstairsResult.Ok;
        }
        (byte[] stagedData, byte[] stagedContexts) = _staging[extent] ?? (new byte[ExtentBlocks * BlockSize], new byte[ExtentBlocks * BlockContext.Size]);
        _staging[extent] = null;
        long first = (long)extent * ExtentBlocks;
        stagedData.CopyTo(_data.AsSpan((int)(first * BlockSize)));
        stagedContexts.CopyTo(_contexts.AsSpan((int)(first * BlockContext.Size)));
        _meta[extent] = meta;
        _repairPending[extent] = false;
        return DownstairsResult.Ok;
    }

    internal DownstairsResult ApplyMarkPending(IReadOnlyList<int> extents)
    {
        foreach (int e in extents)
        {
            _repairPending[e] = true;
        }
        return DownstairsResult.Ok;
    }

    private ulong StoredHash(long block) => BinaryPrimitives.ReadUInt64LittleEndian(_contexts.AsSpan((int)(block * BlockContext.Size)));

    private void SetContext(long block, ulong hash, ulong writeId)
    {
        Span<byte> c = _contexts.AsSpan((int)(block * BlockContext.Size), BlockContext.Size);
        BinaryPrimitives.WriteUInt64LittleEndian(c, hash);
        BinaryPrimitives.WriteUInt64LittleEndian(c[8..], writeId);
    }
}

/// <summary>
/// One scripted connection. A request is recorded and queued when the method is called; it runs
/// once every earlier overlapping request on this connection finished (a flush overlaps everything,
/// as the real scheduler's barrier), after the replica's gate lets its kind through.
/// </summary>
internal sealed class FakeDownstairs : IDownstairs
{
    private readonly FakeReplica _replica;
    private readonly List<Pending> _inFlight = [];
    private readonly CancellationTokenSource _closed = new();
    private string? _closeReason;

    private readonly IDownstairsReplyHandler _replies;

    public FakeDownstairs(FakeReplica replica, int serial, HelloReply region, ulong generation, IDownstairsReplyHandler replies)
    {
        _replies = replies;
        _replica = replica;
        Serial = serial;
        Region = region;
        Generation = generation;
    }

    public int Serial { get; }

    public ulong Generation { get; }

    public HelloReply Region { get; }

    public bool IsClosed
    {
        get
        {
            lock (_replica.Sync)
            {
                return _closeReason is not null;
            }
        }
    }

    public Task<DownstairsResult> WriteAsync(ulong jobId, long firstBlock, ReadOnlyMemory<byte> data, ReadOnlyMemory<byte> hashes, CancellationToken cancellationToken = default) =>
        Enqueue(OpKind.Write, jobId, firstBlock, data.Length / _replica.BlockSize, 0,
            () => Fenced() ?? _replica.ApplyWrite(firstBlock, data.Span, hashes.Span, jobId), cancellationToken);

    public Task<DownstairsResult> ReadAsync(ulong jobId, long firstBlock, Memory<byte> data, Memory<byte> hashes, CancellationToken cancellationToken = default) =>
        Enqueue(OpKind.Read, jobId, firstBlock, data.Length / _replica.BlockSize, 0,
            () => Fenced() ?? _replica.ApplyRead(firstBlock, data.Span, hashes.Span), cancellationToken);

    public Task<DownstairsResult> FlushAsync(ulong jobId, ulong flushNumber, ulong generation, CancellationToken cancellationToken = default) =>
        Enqueue(OpKind.Flush, jobId, 0, 0, flushNumber, () => Fenced() ?? _replica.ApplyFlush(flushNumber, generation), cancellationToken);

    public Task<ExtentReadResult> ReadExtentAsync(ulong jobId, ExtentRange range, Memory<byte> contexts, Memory<byte> data, CancellationToken cancellationToken = default) =>
        Enqueue(OpKind.ExtentRead, jobId, ((long)range.Extent * _replica.ExtentBlocks) + range.FirstBlock, range.BlockCount, 0,
            () => Fenced() is { } fenced ? new ExtentReadResult(fenced, default) : _replica.ApplyExtentRead(range, contexts.Span, data.Span), cancellationToken);

    public Task<DownstairsResult> WriteExtentAsync(ulong jobId, ExtentRange range, ReadOnlyMemory<byte> contexts, ReadOnlyMemory<byte> data, CancellationToken cancellationToken = default) =>
        Enqueue(OpKind.ExtentWrite, jobId, ((long)range.Extent * _replica.ExtentBlocks) + range.FirstBlock, range.BlockCount, 0,
            () => Fenced() ?? _replica.ApplyExtentWrite(range, contexts.Span, data.Span), cancellationToken);

    public Task<DownstairsResult> CommitExtentAsync(ulong jobId, int extent, ExtentMeta meta, bool inPlace = false, CancellationToken cancellationToken = default) =>
        Enqueue(OpKind.ExtentCommit, jobId, (long)extent * _replica.ExtentBlocks, _replica.ExtentBlocks, 0,
            () => Fenced() ?? _replica.ApplyExtentCommit(extent, meta, inPlace), cancellationToken);

    public Task<DownstairsResult> MarkRepairPendingAsync(ulong jobId, IReadOnlyList<int> extents, CancellationToken cancellationToken = default) =>
        Enqueue(OpKind.MarkPending, jobId, 0, 0, 0, () => Fenced() ?? _replica.ApplyMarkPending([.. extents]), cancellationToken);

    // The engine's interface: each request queued at the call (in call order), its reply delivered
    // to the connection's sink once it ran or the connection ended.

    public void SubmitWrite(ulong jobId, long firstBlock, ReadOnlyMemory<byte> data, ReadOnlyMemory<byte> hashes) =>
        Forward(OpKind.Write, jobId, WriteAsync(jobId, firstBlock, data, hashes));

    public void SubmitRead(ulong jobId, long firstBlock, Memory<byte> data, Memory<byte> hashes) =>
        Forward(OpKind.Read, jobId, ReadAsync(jobId, firstBlock, data, hashes));

    public void SubmitFlush(ulong jobId, ulong flushNumber, ulong generation) =>
        Forward(OpKind.Flush, jobId, FlushAsync(jobId, flushNumber, generation));

    public void SubmitReadExtent(ulong jobId, ExtentRange range, Memory<byte> contexts, Memory<byte> data) =>
        ReadExtentAsync(jobId, range, contexts, data).ContinueWith(
            t =>
            {
                _replies.OnReply(jobId, t.IsCompletedSuccessfully ? t.Result.Result : Lost(t), t.IsCompletedSuccessfully ? t.Result.Meta : default);
                _replica.RecordReply(OpKind.ExtentRead, jobId);
            },
            CancellationToken.None, TaskContinuationOptions.ExecuteSynchronously, TaskScheduler.Default);

    public void SubmitWriteExtent(ulong jobId, ExtentRange range, ReadOnlyMemory<byte> contexts, ReadOnlyMemory<byte> data) =>
        Forward(OpKind.ExtentWrite, jobId, WriteExtentAsync(jobId, range, contexts, data));

    public void SubmitCommitExtent(ulong jobId, int extent, ExtentMeta meta, bool inPlace) =>
        Forward(OpKind.ExtentCommit, jobId, CommitExtentAsync(jobId, extent, meta, inPlace));

    public void SubmitMarkRepairPending(ulong jobId, IReadOnlyList<int> extents) =>
        Forward(OpKind.MarkPending, jobId, MarkRepairPendingAsync(jobId, extents));

    public void BeginBatch()
    {
    }

    public void EndBatch()
    {
    }

    private void Forward(OpKind kind, ulong jobId, Task<DownstairsResult> task) =>
        task.ContinueWith(t =>
            {
                _replies.OnReply(jobId, t.IsCompletedSuccessfully ? t.Result : Lost(t), default);
                _replica.RecordReply(kind, jobId); // after the post: the reply is in the engine's queue
            },
            CancellationToken.None, TaskContinuationOptions.ExecuteSynchronously, TaskScheduler.Default);

    private static DownstairsResult Lost(Task t) => DownstairsResult.Lost(new DownstairsConnectionException(t.Exception?.InnerException?.Message ?? "cancelled"));

    public ValueTask DisposeAsync()
    {
        Close("connection closed by the upstairs");
        return ValueTask.CompletedTask;
    }

    /// <summary>Ends the connection: pending requests fail with a connection error, later ones at once.</summary>
    public void Close(string reason)
    {
        lock (_replica.Sync)
        {
            _closeReason ??= reason;
        }
        _closed.Cancel();
    }

    private DownstairsResult? Fenced() =>
        Region.ReadOnly ? new DownstairsResult(ResultCode.ReadOnly)
        : Generation < _replica.HighestGeneration ? new DownstairsResult(ResultCode.Fenced, 0, "a newer generation took over")
        : null;

    private Task<T> Enqueue<T>(OpKind kind, ulong jobId, long firstBlock, int blockCount, ulong flushNumber, Func<T> apply, CancellationToken cancellationToken)
    {
        var pending = new Pending(kind, firstBlock, firstBlock + blockCount);
        var result = new TaskCompletionSource<T>(TaskCreationOptions.RunContinuationsAsynchronously);
        Task[] earlier;
        lock (_replica.Sync)
        {
            if (_replica.IgnoreCancellation)
            {
                cancellationToken = CancellationToken.None;
            }
            _replica.Record(new ReceivedOp(Serial, kind, jobId, firstBlock, blockCount, flushNumber));
            if (_closeReason is { } reason)
            {
                return Task.FromException<T>(new DownstairsConnectionException(reason));
            }
            earlier = [.. _inFlight.Where(p => p.Overlaps(pending)).Select(p => p.Finished.Task)];
            _inFlight.Add(pending);
        }
        _ = RunAsync();
        return result.Task;

        async Task RunAsync()
        {
            using var stop = CancellationTokenSource.CreateLinkedTokenSource(_closed.Token, cancellationToken);
            try
            {
                await Task.WhenAll(earlier).WaitAsync(stop.Token);
                await _replica.WaitAtGateAsync(kind, stop.Token);
                if (_replica.OpDelay > TimeSpan.Zero)
                {
                    await Task.Delay(_replica.OpDelay, stop.Token);
                }
                T value;
                lock (_replica.Sync)
                {
                    stop.Token.ThrowIfCancellationRequested();
                    value = apply();
                }
                // Applied: later requests may run now, while this reply may still be on its way.
                lock (_replica.Sync)
                {
                    _inFlight.Remove(pending);
                }
                pending.Finished.TrySetResult();
                await _replica.WaitForReplyGateAsync(_closed.Token);
                result.TrySetResult(value);
            }
            catch (OperationCanceledException) when (cancellationToken.IsCancellationRequested && !_closed.IsCancellationRequested)
            {
                result.TrySetCanceled(cancellationToken);
            }
            catch (OperationCanceledException)
            {
                string reason;
                lock (_replica.Sync)
                {
                    reason = _closeReason ?? "closed";
                }
                result.TrySetException(new DownstairsConnectionException(reason));
            }
            finally
            {
                lock (_replica.Sync)
                {
                    _inFlight.Remove(pending);
                }
                pending.Finished.TrySetResult();
            }
        }
    }

    private sealed class Pending(OpKind kind, long first, long end)
    {
        public TaskCompletionSource Finished { get; } = new(TaskCreationOptions.RunContinuationsAsynchronously);

        public bool Overlaps(Pending other) =>
            IsBarrier || other.IsBarrier
            || (!(kind == OpKind.Read && other.IsRead) && first < other.End && other.First < end);

        private bool IsBarrier => kind is OpKind.Flush or OpKind.MarkPending;

        private bool IsRead => kind == OpKind.Read;

        private long First => first;

        private long End => end;
    }
}

/// <summary>Hands out connections to the three fake replicas.</summary>
internal sealed class FakeConnector(IReadOnlyList<FakeReplica> replicas) : IDownstairsConnector
{
    public Task<IDownstairs> ConnectAsync(int replica, HelloRequest hello, IDownstairsReplyHandler replies, CancellationToken cancellationToken) =>
        replicas[replica].ConnectAsync(hello, replies, cancellationToken);
}
