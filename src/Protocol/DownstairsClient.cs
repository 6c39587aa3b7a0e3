using System.Buffers;
using System.Buffers.Binary;
using System.Collections.Concurrent;
using System.IO.Pipelines;
using System.Net;
using System.Net.Sockets;
using NbdServer.Common.Tls;

namespace NbdServer.Protocol;

/// <summary>Client-side limits.</summary>
public sealed record DownstairsClientOptions
{
    /// <summary>Largest reply body accepted (the Hello reply of a large region, or a big read).</summary>
    public int MaxFrameBytes { get; init; } = Wire.DefaultMaxFrameBytes;

    public TimeSpan ConnectTimeout { get; init; } = TimeSpan.FromSeconds(10);

    public int ReceiveBufferBytes { get; init; } = 64 << 10;

    /// <summary>Mutual TLS towards the downstairs (our client certificate, its certificate checked against our CA); null: plaintext.</summary>
    public TlsClientPolicy? Tls { get; init; }

    /// <summary>The name the downstairs' certificate must carry; null: the address connected to (it must be an IP alternative name).</summary>
    public string? TlsServerName { get; init; }
    /// <summary>
    /// When nothing has been sent for this long, a Ping is: it checks an idle link, and the downstairs
    /// closes a connection silent for its --idle-timeout (30 s by default). Zero: never.
    /// </summary>
    public TimeSpan PingInterval { get; init; } = TimeSpan.FromSeconds(5);
}

/// <summary>Typed outcome of one job.</summary>
public readonly record struct DownstairsResult(ResultCode Code, int Errno = 0, string? Message = null)
{
    public static DownstairsResult Ok => default;

    public bool IsOk => Code == ResultCode.Ok;

    /// <summary>
    /// Set when the job ended because the link did (lost, broken by an invalid reply, disposed), not by a
    /// reply: the replica's state for this job is unknown. The code is then <see cref="ResultCode.Unavailable"/>.
    /// </summary>
    public DownstairsConnectionException? LinkFailure { get; init; }

    public bool IsLinkFailure => LinkFailure is not null;

    /// <summary>The outcome of a job cut off by the end of its link.</summary>
    public static DownstairsResult Lost(DownstairsConnectionException failure) => new(ResultCode.Unavailable, 0, failure.Message) { LinkFailure = failure };

    public override string ToString() => IsOk ? "ok" : $"{ResultCodes.Name(Code)}{(Errno != 0 ? $" (errno {Errno})" : "")}: {Message}";
}

public readonly record struct ExtentReadResult(DownstairsResult Result, ExtentMeta Meta);

/// <summary>The downstairs refused the Hello (fenced, wrong region, version…).</summary>
public sealed class DownstairsRefusedException(DownstairsResult result) : Exception($"downstairs refused the connection: {result}")
{
    public DownstairsResult Result { get; } = result;
}

/// <summary>The link to a downstairs is gone; every job still pending on it fails with this.</summary>
public sealed class DownstairsConnectionException(string message, Exception? inner = null) : IOException(message, inner);

/// <summary>
/// One connection to one downstairs: negotiate, then send jobs pipelined (many in flight, any order
/// of completion) and receive their typed replies. Thread-safe. Job ids are the caller's (the engine's
/// job numbers) and must be unique among the jobs in flight on this connection.
/// </summary>
/// <remarks>
/// <para>
/// Requests go on the wire in the order they were submitted (calls from one thread in call order):
/// every <c>Submit…</c> and every Task-returning call queues its frame synchronously and never waits.
/// There is no send window here on purpose: a window whose waiters resume in any order is how
/// overlapping writes once reached a replica out of order. Keeping the jobs in flight at most
/// <see cref="MaxJobs"/> is the caller's job (the engine's admission); beyond it the downstairs simply
/// stops reading, which holds the sender back without reordering anything.
/// </para>
/// <para>
/// Payload memory passed to a write-type call must stay untouched, and destination memory of a read
/// must stay valid, until the job is reported (see <see cref="IDownstairsReplyHandler.OnReply"/>):
/// it is sent straight from there and filled straight into there, no copy.
/// </para>
/// </remarks>
public sealed class DownstairsClient : IAsyncDisposable
{
    private const ulong InternalIdBase = 0xFFFF_0000_0000_0000;

    /// <summary>Job records kept for reuse once their job is reported; more than this in flight at once are allocated and dropped.</summary>
    private const int MaxPooledJobs = 1024;

    /// <summary>Largest fixed body of a pooled request frame (ExtentCommit's); ExtentsPending, variable, gets a frame of its own.</summary>
    private const int MaxPooledFixedBody = ExtentCommitRequest.BodySize;

    private readonly Stream _stream;
    private readonly FrameSender _sender;
    private readonly PipeReader _reader;
    private readonly int _maxFrameBytes;
    private readonly Task _receiveLoop;
    private readonly ITimer? _pinger;
    private readonly TimeSpan _pingInterval;

    /// <summary>
    /// The highest generation an extent read may report: a writer's own (it fenced out every higher
    /// one), a reader's the highest the Hello reply reported.
    /// </summary>
    private readonly ulong _generationLimit;

    /// <summary>Guards <see cref="_pending"/>, <see cref="_staged"/> and <see cref="_batchDepth"/>; held for a few instructions, never across a call out.</summary>
    private readonly Lock _lock = new();
    private readonly Dictionary<ulong, Pending> _pending = [];
    private readonly List<Pending> _staged = [];
    private int _batchDepth;
    private readonly ConcurrentQueue<Pending> _pool = new();
    private int _pooled;

    private DownstairsConnectionException? _failure;
    private long _internalIds;
    private long _lastSend;

    private DownstairsClient(Stream stream, FrameSender sender, PipeReader reader, HelloReply region, DownstairsClientOptions options, ulong generationLimit)
    {
        _generationLimit = generationLimit;
        _stream = stream;
        _sender = sender;
        _reader = reader;
        Region = region;
        _maxFrameBytes = options.MaxFrameBytes;
        _receiveLoop = Task.Run(ReceiveLoopAsync);
        // A sender that stops (its write failed) ends the link at once: frames queued after it would
        // otherwise be dropped silently and their jobs left for the engine's watchdog.
        _ = sender.Completion.ContinueWith(static (t, state) => ((DownstairsClient)state!).SenderStopped(t), this,
            CancellationToken.None, TaskContinuationOptions.ExecuteSynchronously, TaskScheduler.Default);
        _lastSend = System.Diagnostics.Stopwatch.GetTimestamp();
        _pingInterval = options.PingInterval;
        if (_pingInterval > TimeSpan.Zero)
        {
            // Checked four times per interval, so the link is never silent much longer than the interval.
            TimeSpan period = _pingInterval / 4;
            _pinger = TimeProvider.System.CreateTimer(_ => PingIfIdle(), null, period, period);
        }
    }

    private void PingIfIdle()
    {
        if (Failure is not null || System.Diagnostics.Stopwatch.GetElapsedTime(Volatile.Read(ref _lastSend)) < _pingInterval)
        {
            return;
        }
        // The outcome does not matter here: a broken link fails the jobs that are waiting on it.
        _ = PingAsync().ContinueWith(static t => _ = t.Exception, CancellationToken.None, TaskContinuationOptions.OnlyOnFaulted, TaskScheduler.Default);
    }

    /// <summary>What the downstairs said in its Hello reply: geometry, limits, per-extent state.</summary>
    public HelloReply Region { get; }

    public int BlockSize => Region.BlockSize;

    /// <summary>
    /// Jobs the downstairs takes in flight on this connection (its --max-jobs, from the Hello reply).
    /// The client does not enforce it: the caller keeps its jobs in flight at or below it (a job over it
    /// is not refused, it waits unread in the socket and delays everything after it).
    /// </summary>
    public int MaxJobs => Region.MaxJobs;

    /// <summary>Completes when the connection ends (the receive loop stops); never faults.</summary>
    public Task Completion => _receiveLoop;

    /// <summary>Why the connection ended, if it did.</summary>
    public Exception? Failure => Volatile.Read(ref _failure);

    /// <summary>Jobs submitted and not yet answered (or failed).</summary>
    public int InFlight
    {
        get
        {
            lock (_lock)
            {
                return _pending.Count;
            }
        }
    }

    public static async Task<DownstairsClient> ConnectAsync(IPEndPoint endpoint, HelloRequest hello, DownstairsClientOptions? options = null, CancellationToken cancellationToken = default)
    {
        options ??= new DownstairsClientOptions();
        var socket = new Socket(endpoint.AddressFamily, SocketType.Stream, ProtocolType.Tcp) { NoDelay = true };
        try
        {
            using var timeout = CancellationTokenSource.CreateLinkedTokenSource(cancellationToken);
            timeout.CancelAfter(options.ConnectTimeout);
            await socket.ConnectAsync(endpoint, timeout.Token).ConfigureAwait(false);
            Stream stream = new NetworkStream(socket, ownsSocket: true);
            if (options.Tls is { } tls)
            {
                try
                {
                    // The connect timeout covers the handshake too: a peer that accepts and stays silent is as dead as one that never accepts.
                    stream = await tls.AuthenticateAsync(stream, options.TlsServerName ?? endpoint.Address.ToString(), options.ConnectTimeout, timeout.Token).ConfigureAwait(false);
                }
                catch (TlsHandshakeException e)
                {
                    throw new DownstairsConnectionException($"TLS with downstairs {endpoint}: {e.Message}", e);
                }
            }
            return await ConnectAsync(stream, hello, options, timeout.Token).ConfigureAwait(false);
        }
        catch
        {
            socket.Dispose();
            throw;
        }
    }

    /// <summary>Negotiates over an already-open stream (in-process transports in tests).</summary>
    public static async Task<DownstairsClient> ConnectAsync(Stream stream, HelloRequest hello, DownstairsClientOptions? options = null, CancellationToken cancellationToken = default)
    {
        options ??= new DownstairsClientOptions();
        var sender = new FrameSender(stream);
        var reader = LinkReader.Create(stream, options.ReceiveBufferBytes);
        try
        {
            sender.Enqueue(hello.Encode());
            while (true)
            {
                ReadResult result = await reader.ReadAsync(cancellationToken).ConfigureAwait(false);
                ReadOnlySequence<byte> buffer = result.Buffer;
                if (FrameReader.TryRead(ref buffer, options.MaxFrameBytes, out FrameHeader header, out ReadOnlySequence<byte> body))
                {
                    if (header.Type != MessageType.HelloReply)
                    {
                        throw new DownstairsProtocolException($"expected a Hello reply, got {header.Type}");
                    }
                    if (header.Result != ResultCode.Ok)
                    {
                        ErrorBody error = ErrorBody.Parse(body);
                        throw new DownstairsRefusedException(new DownstairsResult(header.Result, error.Errno, error.Message));
                    }
                    HelloReply reply = HelloReply.Parse(body);
                    reader.AdvanceTo(buffer.Start);
                    return new DownstairsClient(stream, sender, reader, reply, options, hello.ReadOnly ? reply.HighestGeneration : hello.Generation);
                }
                if (result.IsCompleted)
                {
                    throw new DownstairsConnectionException("downstairs closed the connection during Hello");
                }
                reader.AdvanceTo(buffer.Start, buffer.End);
            }
        }
        catch
        {
            sender.Complete();
            await reader.CompleteAsync().ConfigureAwait(false);
            await stream.DisposeAsync().ConfigureAwait(false);
            throw;
        }
    }

    // ------------------------------------------------------------------ operations: callbacks

    /// <summary>
    /// Writes whole blocks starting at <paramref name="firstBlock"/>; <paramref name="hashes"/>: one 8-byte
    /// little-endian <see cref="BlockContext.Hash"/> per block. Queued at once, never waits.
    /// </summary>
    public void SubmitWrite(ulong jobId, long firstBlock, ReadOnlyMemory<byte> data, ReadOnlyMemory<byte> hashes, IDownstairsReplyHandler handler)
    {
        int count = BlockCount(data.Length);
        CheckHashes(hashes.Length, count);
        Pending p = Rent(jobId, MessageType.WriteReply, handler);
        p.Frame.Reset(MessageType.Write, ResultCode.Ok, jobId, BlockRange.FixedSize, new BlockRange(firstBlock, count), static (d, r) => r.Write(d), hashes, data);
        Submit(p, p.Frame);
    }

    /// <summary>Reads <c>data.Length / BlockSize</c> blocks into <paramref name="data"/> and their stored hashes (0 = never written) into <paramref name="hashes"/> (may be empty).</summary>
    public void SubmitRead(ulong jobId, long firstBlock, Memory<byte> data, Memory<byte> hashes, IDownstairsReplyHandler handler)
    {
        int count = BlockCount(data.Length);
        if (!hashes.IsEmpty)
        {
            CheckHashes(hashes.Length, count);
        }
        Pending p = Rent(jobId, MessageType.ReadReply, handler);
        p.Count = count;
        p.Destination1 = hashes;
        p.Destination2 = data;
        p.Frame.Reset(MessageType.Read, ResultCode.Ok, jobId, BlockRange.FixedSize, new BlockRange(firstBlock, count), static (d, r) => r.Write(d));
        Submit(p, p.Frame);
    }

    /// <summary>Makes every write answered before it durable and records (generation, flush number) on the dirty extents.</summary>
    public void SubmitFlush(ulong jobId, ulong flushNumber, ulong generation, IDownstairsReplyHandler handler)
    {
        Pending p = Rent(jobId, MessageType.FlushReply, handler);
        p.Frame.Reset(MessageType.Flush, ResultCode.Ok, jobId, FlushRequest.BodySize, new FlushRequest(flushNumber, generation), static (d, f) =>
        {
            BinaryPrimitives.WriteUInt64LittleEndian(d, f.FlushNumber);
            BinaryPrimitives.WriteUInt64LittleEndian(d[8..], f.Generation);
        });
        Submit(p, p.Frame);
    }

    /// <summary>Live repair, source side: blocks of one extent as stored, with their 16-byte contexts; the extent's metadata comes with the reply.</summary>
    public void SubmitReadExtent(ulong jobId, ExtentRange range, Memory<byte> contexts, Memory<byte> data, IDownstairsReplyHandler handler)
    {
        CheckExtentBuffers(range, contexts.Length, data.Length);
        Pending p = Rent(jobId, MessageType.ExtentReadReply, handler);
        p.Count = range.BlockCount;
        p.Destination1 = contexts;
        p.Destination2 = data;
        p.Frame.Reset(MessageType.ExtentRead, ResultCode.Ok, jobId, ExtentRange.FixedSize, range, static (d, x) => x.Write(d));
        Submit(p, p.Frame);
    }

    /// <summary>Live repair, target side: stage part of a healthy copy (set <see cref="ExtentRange.BeginFlag"/> on the first chunk).</summary>
    public void SubmitWriteExtent(ulong jobId, ExtentRange range, ReadOnlyMemory<byte> contexts, ReadOnlyMemory<byte> data, IDownstairsReplyHandler handler)
    {
        CheckExtentBuffers(range, contexts.Length, data.Length);
        Pending p = Rent(jobId, MessageType.ExtentWriteReply, handler);
        p.Frame.Reset(MessageType.ExtentWrite, ResultCode.Ok, jobId, ExtentRange.FixedSize, range, static (d, x) => x.Write(d), contexts, data);
        Submit(p, p.Frame);
    }

    /// <summary>
    /// Live repair: replace the extent by its staged copy (unsent blocks read as unwritten), or with
    /// <paramref name="inPlace"/> make the blocks written in place durable; then record <paramref name="meta"/>.
    /// </summary>
    public void SubmitCommitExtent(ulong jobId, int extent, ExtentMeta meta, bool inPlace, IDownstairsReplyHandler handler)
    {
        Pending p = Rent(jobId, MessageType.ExtentCommitReply, handler);
        p.Frame.Reset(MessageType.ExtentCommit, ResultCode.Ok, jobId, ExtentCommitRequest.BodySize, new ExtentCommitRequest(extent, meta, inPlace), static (d, c) =>
        {
            BinaryPrimitives.WriteInt32LittleEndian(d, c.Extent);
            BinaryPrimitives.WriteUInt32LittleEndian(d[4..], c.Flags);
            BinaryPrimitives.WriteUInt64LittleEndian(d[8..], c.Meta.Generation);
            BinaryPrimitives.WriteUInt64LittleEndian(d[16..], c.Meta.FlushNumber);
        });
        Submit(p, p.Frame);
    }

    /// <summary>Live repair, target side: these extents are stale until their copy is committed; flushes must not stamp them.</summary>
    public void SubmitMarkRepairPending(ulong jobId, IReadOnlyList<int> extents, IDownstairsReplyHandler handler)
    {
        ArgumentNullException.ThrowIfNull(extents);
        Pending p = Rent(jobId, MessageType.ExtentsPendingReply, handler);
        // Variable length (rare: once per repair): a pooled frame of its own rather than the job's small one.
        OutgoingFrame frame = OutgoingFrame.Create(MessageType.ExtentsPending, ResultCode.Ok, jobId, ExtentsPendingRequest.BodySize(extents.Count), extents,
            static (d, x) => ExtentsPendingRequest.Write(d, x));
        frame.Completed = FrameDone;
        frame.State = p;
        Submit(p, frame);
    }

    /// <summary>
    /// Holds the frames submitted from now on until the matching <see cref="EndBatch"/>, which hands them
    /// to the sender together: a caller queuing many jobs at once wakes the sender once, and they leave
    /// in one gather send. Nests; every call must be matched.
    /// </summary>
    public void BeginBatch()
    {
        lock (_lock)
        {
            _batchDepth++;
        }
    }

    /// <summary>Ends a <see cref="BeginBatch"/>; the outermost one queues the held frames, in submission order.</summary>
    public void EndBatch()
    {
        lock (_lock)
        {
            if (_batchDepth == 0)
            {
                throw new InvalidOperationException("EndBatch without BeginBatch");
            }
            if (--_batchDepth > 0)
            {
                return;
            }
            if (_staged.Count > 0)
            {
                Volatile.Write(ref _lastSend, System.Diagnostics.Stopwatch.GetTimestamp());
            }
            foreach (Pending p in _staged)
            {
                if (!_sender.TryEnqueue(p.CurrentFrame!))
                {
                    // The sender has stopped (the link is failing, see Submit): these frames will never be
                    // sent; their jobs are failed by the receive loop.
                    Dropped(p);
                }
            }
            _staged.Clear();
        }
    }

    // ------------------------------------------------------------------ operations: tasks (tools, tests, setup)

    /// <summary>
    /// Writes whole blocks starting at <paramref name="firstBlock"/>. <paramref name="hashes"/>: one
    /// 8-byte little-endian <see cref="BlockContext.Hash"/> per block, or empty to have them computed.
    /// A lost link faults the task with <see cref="DownstairsConnectionException"/>; <paramref name="cancellationToken"/>
    /// is only checked before queuing (a queued job ends with its reply or its link).
    /// </summary>
    public Task<DownstairsResult> WriteAsync(ulong jobId, long firstBlock, ReadOnlyMemory<byte> data, ReadOnlyMemory<byte> hashes = default, CancellationToken cancellationToken = default)
    {
        if (cancellationToken.IsCancellationRequested)
        {
            return Task.FromCanceled<DownstairsResult>(cancellationToken);
        }
        if (hashes.IsEmpty)
        {
            int count = BlockCount(data.Length);
            byte[] computed = new byte[count * Wire.HashSize];
            BlockContext.HashBlocks(data.Span, BlockSize, computed);
            hashes = computed;
        }
        var handler = new TaskReplyHandler();
        SubmitWrite(jobId, firstBlock, data, hashes, handler);
        return handler.Result;
    }

    /// <summary>Reads <c>data.Length / BlockSize</c> blocks into <paramref name="data"/> and their stored hashes (0 = never written) into <paramref name="hashes"/> (may be empty).</summary>
    public Task<DownstairsResult> ReadAsync(ulong jobId, long firstBlock, Memory<byte> data, Memory<byte> hashes = default, CancellationToken cancellationToken = default)
    {
        if (cancellationToken.IsCancellationRequested)
        {
            return Task.FromCanceled<DownstairsResult>(cancellationToken);
        }
        var handler = new TaskReplyHandler();
        SubmitRead(jobId, firstBlock, data, hashes, handler);
        return handler.Result;
    }

    /// <summary>Makes every write answered before it durable and records (generation, flush number) on the dirty extents.</summary>
    public Task<DownstairsResult> FlushAsync(ulong jobId, ulong flushNumber, ulong generation, CancellationToken cancellationToken = default)
    {
        if (cancellationToken.IsCancellationRequested)
        {
            return Task.FromCanceled<DownstairsResult>(cancellationToken);
        }
        var handler = new TaskReplyHandler();
        SubmitFlush(jobId, flushNumber, generation, handler);
        return handler.Result;
    }

    /// <summary>Round trip on the link (bypasses the IO queue); uses an internal job id.</summary>
    public async Task<TimeSpan> PingAsync(CancellationToken cancellationToken = default)
    {
        cancellationToken.ThrowIfCancellationRequested();
        ulong id = InternalIdBase + (ulong)Interlocked.Increment(ref _internalIds);
        long start = System.Diagnostics.Stopwatch.GetTimestamp();
        var handler = new TaskReplyHandler();
        Pending p = Rent(id, MessageType.PingReply, handler);
        p.Frame.Reset(MessageType.Ping, ResultCode.Ok, id, 8, id, static (d, n) => BinaryPrimitives.WriteUInt64LittleEndian(d, n));
        Submit(p, p.Frame);
        DownstairsResult r = await handler.Result.ConfigureAwait(false);
        if (!r.IsOk)
        {
            throw new DownstairsConnectionException($"ping failed: {r}");
        }
        return System.Diagnostics.Stopwatch.GetElapsedTime(start);
    }

    /// <summary>Live repair, source side: blocks [first, first+count) of one extent as stored, with their 16-byte contexts, and the extent's metadata.</summary>
    public Task<ExtentReadResult> ReadExtentAsync(ulong jobId, ExtentRange range, Memory<byte> contexts, Memory<byte> data, CancellationToken cancellationToken = default)
    {
        if (cancellationToken.IsCancellationRequested)
        {
            return Task.FromCanceled<ExtentReadResult>(cancellationToken);
        }
        var handler = new TaskReplyHandler();
        // Buffers that do not fit are refused here, synchronously, like every other call's arguments.
        SubmitReadExtent(jobId, range, contexts, data, handler);
        return WithMetaAsync(handler);

        static async Task<ExtentReadResult> WithMetaAsync(TaskReplyHandler handler)
        {
            DownstairsResult r = await handler.Result.ConfigureAwait(false);
            return new ExtentReadResult(r, handler.Meta);
        }
    }

    /// <summary>Live repair, target side: stage part of a healthy copy (set <see cref="ExtentRange.BeginFlag"/> on the first chunk).</summary>
    public Task<DownstairsResult> WriteExtentAsync(ulong jobId, ExtentRange range, ReadOnlyMemory<byte> contexts, ReadOnlyMemory<byte> data, CancellationToken cancellationToken = default)
    {
        if (cancellationToken.IsCancellationRequested)
        {
            return Task.FromCanceled<DownstairsResult>(cancellationToken);
        }
        var handler = new TaskReplyHandler();
        SubmitWriteExtent(jobId, range, contexts, data, handler);
        return handler.Result;
    }

    /// <summary>Live repair: replace the extent by its staged copy (or, <paramref name="inPlace"/>, make it durable) and record <paramref name="meta"/>.</summary>
    public Task<DownstairsResult> CommitExtentAsync(ulong jobId, int extent, ExtentMeta meta, bool inPlace = false, CancellationToken cancellationToken = default)
    {
        if (cancellationToken.IsCancellationRequested)
        {
            return Task.FromCanceled<DownstairsResult>(cancellationToken);
        }
        var handler = new TaskReplyHandler();
        SubmitCommitExtent(jobId, extent, meta, inPlace, handler);
        return handler.Result;
    }

    /// <summary>Live repair, target side: these extents are stale until their copy is committed; flushes must not stamp them.</summary>
    public Task<DownstairsResult> MarkRepairPendingAsync(ulong jobId, IReadOnlyList<int> extents, CancellationToken cancellationToken = default)
    {
        if (cancellationToken.IsCancellationRequested)
        {
            return Task.FromCanceled<DownstairsResult>(cancellationToken);
        }
        var handler = new TaskReplyHandler();
        SubmitMarkRepairPending(jobId, extents, handler);
        return handler.Result;
    }

    // ------------------------------------------------------------------ plumbing

    private int BlockCount(int bytes)
    {
        if (bytes <= 0 || bytes % BlockSize != 0)
        {
            throw new ArgumentException($"{bytes} bytes is not a positive whole number of {BlockSize}-byte blocks");
        }
        return bytes / BlockSize;
    }

    private static void CheckHashes(int hashBytes, int count)
    {
        if (hashBytes != count * Wire.HashSize)
        {
            throw new ArgumentException($"{hashBytes} bytes of hashes for {count} blocks");
        }
    }

    private void CheckExtentBuffers(ExtentRange range, int contextBytes, int dataBytes)
    {
        if (contextBytes != range.BlockCount * BlockContext.Size || dataBytes != range.BlockCount * BlockSize)
        {
            throw new ArgumentException($"buffers of {contextBytes} context and {dataBytes} data bytes for {range.BlockCount} blocks");
        }
    }

    private Pending Rent(ulong jobId, MessageType replyType, IDownstairsReplyHandler handler)
    {
        ArgumentNullException.ThrowIfNull(handler);
        if (_pool.TryDequeue(out Pending? p))
        {
            Interlocked.Decrement(ref _pooled);
        }
        else
        {
            p = new Pending(this);
        }
        p.JobId = jobId;
        p.ReplyType = replyType;
        p.Handler = handler;
        return p;
    }

    private void Recycle(Pending p)
    {
        p.Clear();
        if (Interlocked.Increment(ref _pooled) <= MaxPooledJobs)
        {
            _pool.Enqueue(p);
        }
        else
        {
            Interlocked.Decrement(ref _pooled);
        }
    }

    /// <summary>
    /// Registers the job, then queues its frame (or holds it for the batch). Whatever happens, the job
    /// is reported exactly once, and never from inside this call.
    /// </summary>
    private void Submit(Pending p, OutgoingFrame frame)
    {
        p.CurrentFrame = frame;
        DownstairsConnectionException? failed;
        lock (_lock)
        {
            failed = _failure;
            if (failed is null)
            {
                if (!_pending.TryAdd(p.JobId, p))
                {
                    p.CurrentFrame = null;
                    frame.ReturnPrefix();
                    Recycle(p);
                    throw new ArgumentException($"job {p.JobId} is already in flight on this connection");
                }
                if (_batchDepth > 0)
                {
                    _staged.Add(p);
                    return;
                }
            }
        }
        if (failed is not null)
        {
            // Never registered: only this path reports it (asynchronously: the caller may hold its own lock).
            p.Result = DownstairsResult.Lost(failed);
            Dropped(p);
            Signal(p, Pending.ReplyKnown, inline: false);
            return;
        }
        Volatile.Write(ref _lastSend, System.Diagnostics.Stopwatch.GetTimestamp());
        if (!_sender.TryEnqueue(frame))
        {
            // The sender stopped between the check above and here. Only a failing link stops it (its own
            // error reaches SenderStopped), so the receive loop is already failing the registered job;
            // failing the link from here could run its reports on this caller's thread.
            Dropped(p);
        }
    }

    /// <summary>A frame that will never reach the sender: it is done with, as far as the sender is concerned.</summary>
    private void Dropped(Pending p)
    {
        OutgoingFrame frame = p.CurrentFrame!;
        frame.ReturnPrefix();
        Signal(p, Pending.SendDone, inline: false);
    }

    /// <summary>The sender is done with a job's frame (sent or dropped): one of the two things its report waits for.</summary>
    private static readonly Action<OutgoingFrame, bool> FrameDone = static (frame, _) =>
    {
        var p = (Pending)frame.State!;
        p.Owner.Signal(p, Pending.SendDone, inline: true);
    };

    /// <summary>
    /// Records one of the two events a job's report waits for — its outcome is known, and the sender has
    /// let go of its frame — and reports the job when both have happened (whichever thread comes last).
    /// </summary>
    private void Signal(Pending p, int what, bool inline)
    {
        int before = Interlocked.Or(ref p.State, what);
        System.Diagnostics.Debug.Assert((before & what) == 0, "each event happens once per job");
        if ((before | what) != Pending.Both)
        {
            return;
        }
        if (inline)
        {
            Deliver(p);
        }
        else
        {
            ThreadPool.UnsafeQueueUserWorkItem(p, preferLocal: false);
        }
    }

    private void Deliver(Pending p)
    {
        ulong jobId = p.JobId;
        DownstairsResult result = p.Result;
        ExtentMeta meta = p.Meta;
        IDownstairsReplyHandler handler = p.Handler!;
        Recycle(p);
        try
        {
            handler.OnReply(jobId, result, meta);
        }
        catch (Exception e)
        {
            // A handler that throws is a bug in the caller; it must not stop the thread reporting the
            // other jobs (the receive loop, the sender). The link goes down so the fault is visible.
            FailLink(new DownstairsConnectionException($"reply handler for job {jobId} failed: {e.Message}", e));
        }
    }

    /// <summary>Ends the link for <paramref name="reason"/> (the first reason wins): the receive loop stops and fails every registered job.</summary>
    private void FailLink(DownstairsConnectionException reason)
    {
        Interlocked.CompareExchange(ref _failure, reason, null);
        _sender.Complete();
        try
        {
            _reader.CancelPendingRead();
        }
        catch (Exception e) when (e is InvalidOperationException or ObjectDisposedException)
        {
            // The receive loop already completed its reader: it is on its way out anyway.
        }
    }

    private void SenderStopped(Task completion)
    {
        Exception? e = completion.Exception?.GetBaseException();
        FailLink(e is null
            ? new DownstairsConnectionException("downstairs link: the sender has stopped")
            : new DownstairsConnectionException($"send to downstairs failed: {e.Message}", e));
    }

    private async Task ReceiveLoopAsync()
    {
        PipeReader reader = _reader;
        var failure = new DownstairsConnectionException("downstairs closed the connection");
        try
        {
            while (true)
            {
                ReadResult result = await reader.ReadAsync().ConfigureAwait(false);
                if (result.IsCanceled)
                {
                    break; // FailLink: its reason is already recorded
                }
                ReadOnlySequence<byte> buffer = result.Buffer;
                while (FrameReader.TryRead(ref buffer, _maxFrameBytes, out FrameHeader header, out ReadOnlySequence<byte> body))
                {
                    Complete(header, body);
                }
                reader.AdvanceTo(buffer.Start, buffer.End);
                if (result.IsCompleted)
                {
                    break;
                }
            }
        }
        catch (DownstairsProtocolException e)
        {
            failure = new DownstairsConnectionException($"invalid frame from downstairs: {e.Message}", e);
        }
        catch (Exception e) when (e is IOException or SocketException or ObjectDisposedException or OperationCanceledException)
        {
            failure = new DownstairsConnectionException($"connection to downstairs lost: {e.Message}", e);
        }
        catch (Exception e)
        {
            // Whatever else ends the loop ends only this link: a transport disposed under a pending read
            // (an in-process pipe says InvalidOperationException), or a reply we failed to handle. The
            // pending jobs fail below and the engine faults this replica; letting it escape would leave
            // Completion faulted with an exception nobody expects.
            failure = new DownstairsConnectionException($"connection to downstairs failed: {e.Message}", e);
        }
        finally
        {
            Interlocked.CompareExchange(ref _failure, failure, null);
            _pinger?.Dispose();
            _sender.Complete();
            await reader.CompleteAsync().ConfigureAwait(false);
            // Also aborts a send under way (a socket's): the sender then lets go of its frames, which is
            // what the failure reports below wait for.
            await _stream.DisposeAsync().ConfigureAwait(false);
            FailRegistered();
        }
    }

    /// <summary>
    /// Fails every registered job with the link's failure. A job whose frame the sender still holds is
    /// reported when the sender lets go of it (a write blocked in the transport may still read its payload).
    /// </summary>
    private void FailRegistered()
    {
        DownstairsResult lost = DownstairsResult.Lost(_failure!);
        List<Pending> failed;
        List<Pending> held;
        lock (_lock)
        {
            failed = [.. _pending.Values];
            _pending.Clear();
            held = [.. _staged];
            _staged.Clear();
        }
        foreach (Pending p in held)
        {
            // Held by an unfinished batch: never reaches the sender now.
            p.CurrentFrame!.ReturnPrefix();
            Signal(p, Pending.SendDone, inline: true);
        }
        foreach (Pending p in failed)
        {
            p.Result = lost;
            Signal(p, Pending.ReplyKnown, inline: true);
        }
    }

    private void Complete(FrameHeader header, ReadOnlySequence<byte> body)
    {
        Pending? pending;
        lock (_lock)
        {
            _pending.Remove(header.JobId, out pending);
        }
        if (pending is null)
        {
            throw new DownstairsProtocolException($"reply {header.Type} for job {header.JobId}, which is not in flight");
        }
        try
        {
            pending.Result = Parse(header, body, pending);
        }
        catch (DownstairsProtocolException e)
        {
            pending.Result = DownstairsResult.Lost(new DownstairsConnectionException($"invalid reply from downstairs: {e.Message}", e));
            Signal(pending, Pending.ReplyKnown, inline: true);
            throw;
        }
        Signal(pending, Pending.ReplyKnown, inline: true);
    }

    private DownstairsResult Parse(FrameHeader header, ReadOnlySequence<byte> body, Pending pending)
    {
        if (header.Type != pending.ReplyType)
        {
            throw new DownstairsProtocolException($"job {header.JobId}: got {header.Type}, expected {pending.ReplyType}");
        }
        if (header.Result != ResultCode.Ok)
        {
            ErrorBody error = ErrorBody.Parse(body);
            return new DownstairsResult(header.Result, error.Errno, error.Message);
        }
        var r = new BodyReader(body);
        switch (header.Type)
        {
            case MessageType.ReadReply:
            {
                int count = r.ReadInt32();
                r.ReadUInt32();
                ExpectPayload(r.Remaining, pending.Count, count, Wire.HashSize, header);
                CopyPayload(ref r, pending, count * Wire.HashSize, count * BlockSize);
                break;
            }
            case MessageType.ExtentReadReply:
            {
                ulong gen = r.ReadUInt64();
                ulong flush = r.ReadUInt64();
                uint flags = r.ReadUInt32();
                int count = r.ReadInt32();
                ExpectPayload(r.Remaining, pending.Count, count, BlockContext.Size, header);
                // The engine commits this metadata onto other replicas (repair): a lie here could
                // plant a generation or flush number nobody can step past.
                if (gen > _generationLimit)
                {
                    throw new DownstairsProtocolException($"misbehaving replica: extent read reports generation {gen}, above {_generationLimit}, the highest this connection can have seen");
                }
                if (flush >= Wire.MaxFlushNumber)
                {
                    throw new DownstairsProtocolException($"misbehaving replica: extent read reports flush number {flush}, at or above the ceiling {Wire.MaxFlushNumber}");
                }
                pending.Meta = new ExtentMeta(gen, flush, (flags & ExtentMeta.DirtyFlag) != 0);
                CopyPayload(ref r, pending, count * BlockContext.Size, count * BlockSize);
                break;
            }
            case MessageType.PingReply:
                Messages.ExpectLength(body, 8, "Ping reply");
                break;
            default:
                Messages.ExpectLength(body, 0, header.Type.ToString());
                break;
        }
        return DownstairsResult.Ok;
    }

    private void ExpectPayload(long remaining, int expectedCount, int count, int perBlockMeta, FrameHeader header)
    {
        if (count != expectedCount || remaining != (long)count * (perBlockMeta + BlockSize))
        {
            throw new DownstairsProtocolException($"job {header.JobId}: {header.Type} carries {count} blocks / {remaining} bytes, expected {expectedCount} blocks");
        }
    }

    private static void CopyPayload(ref BodyReader r, Pending pending, int metaBytes, int dataBytes)
    {
        ReadOnlySequence<byte> meta = r.ReadBytes(metaBytes);
        if (!pending.Destination1.IsEmpty)
        {
            meta.CopyTo(pending.Destination1.Span);
        }
        r.ReadBytes(dataBytes).CopyTo(pending.Destination2.Span);
    }

    public async ValueTask DisposeAsync()
    {
        Interlocked.CompareExchange(ref _failure, new DownstairsConnectionException("client disposed"), null);
        if (_pinger is not null)
        {
            await _pinger.DisposeAsync().ConfigureAwait(false);
        }
        _sender.Complete();
        if (_stream is NetworkStream { Socket: { } socket })
        {
            // Close with a reset, not a FIN: a downstairs we give up on (faulted, stalled) would otherwise
            // read and execute every job still buffered in its socket when it wakes up, work whose result
            // nobody waits for, exactly when the volume wants its disk back for the guest and for repair.
            // Nothing acknowledged is lost: everything we still care about was answered or is repaired.
            try
            {
                socket.LingerState = new LingerOption(true, 0);
            }
            catch (Exception e) when (e is SocketException or ObjectDisposedException)
            {
            }
        }
        await _stream.DisposeAsync().ConfigureAwait(false);
        FailLink(_failure!);
        await _receiveLoop.ConfigureAwait(ConfigureAwaitOptions.SuppressThrowing);
    }

    /// <summary>
    /// One job from submission to report; pooled. Reported once both <see cref="ReplyKnown"/> (a reply, or
    /// the link's failure) and <see cref="SendDone"/> (the sender let go of the frame) have happened.
    /// </summary>
    private sealed class Pending : IThreadPoolWorkItem
    {
        public const int ReplyKnown = 1;
        public const int SendDone = 2;
        public const int Both = ReplyKnown | SendDone;

        public Pending(DownstairsClient owner)
        {
            Owner = owner;
            Frame = OutgoingFrame.CreateReusable(MaxPooledFixedBody);
            Frame.Completed = FrameDone;
            Frame.State = this;
        }

        public DownstairsClient Owner { get; }

        /// <summary>This job's reusable request frame.</summary>
        public OutgoingFrame Frame { get; }

        /// <summary>The frame actually queued: <see cref="Frame"/>, or one of its own for a variable-length request.</summary>
        public OutgoingFrame? CurrentFrame;

        public int State;
        public ulong JobId;
        public MessageType ReplyType;
        public IDownstairsReplyHandler? Handler;
        public int Count;
        public Memory<byte> Destination1;
        public Memory<byte> Destination2;
        public DownstairsResult Result;
        public ExtentMeta Meta;

        public void Clear()
        {
            Frame.ClearPayloads();
            CurrentFrame = null;
            State = 0;
            Handler = null;
            Count = 0;
            Destination1 = default;
            Destination2 = default;
            Result = default;
            Meta = default;
        }

        /// <summary>Reports a job on the thread pool (one registered or failed inside a caller's Submit).</summary>
        void IThreadPoolWorkItem.Execute() => Owner.Deliver(this);
    }

    /// <summary>The Task-returning calls: a completion source fed by the callback path.</summary>
    private sealed class TaskReplyHandler : IDownstairsReplyHandler
    {
        private readonly TaskCompletionSource<DownstairsResult> _tcs = new(TaskCreationOptions.RunContinuationsAsynchronously);

        public Task<DownstairsResult> Result => _tcs.Task;

        public ExtentMeta Meta { get; private set; }

        public void OnReply(ulong jobId, DownstairsResult result, ExtentMeta meta)
        {
            if (result.LinkFailure is { } failure)
            {
                _tcs.TrySetException(failure);
                return;
            }
            Meta = meta;
            _tcs.TrySetResult(result);
        }
    }
}
