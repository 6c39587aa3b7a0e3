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

    /// <summary>Jobs sent but not answered; further calls wait. Also capped by the downstairs' own limit.</summary>
    public int MaxInFlightJobs { get; init; } = 1024;

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
/// of completion) and await their typed replies. Thread-safe. Job ids are the caller's (the engine's
/// job numbers) and must be unique among the jobs in flight on this connection.
/// </summary>
/// <remarks>
/// Payload memory passed to a Write/ExtentWrite must stay untouched until the returned task
/// completes (it is sent straight from there, no copy). Destination memory of a Read is filled by
/// the receive loop before the task completes. Cancellation applies to waiting for a send slot;
/// once sent, a job can only end with its reply or the connection.
/// </remarks>
public sealed class DownstairsClient : IAsyncDisposable
{
    private const ulong InternalIdBase = 0xFFFF_0000_0000_0000;

    private readonly Stream _stream;
    private readonly FrameSender _sender;
    private readonly SemaphoreSlim _slots;
    private readonly ConcurrentDictionary<ulong, Pending> _pending = new();
    private readonly int _maxFrameBytes;
    private readonly Task _receiveLoop;
    private readonly ITimer? _pinger;
    private readonly TimeSpan _pingInterval;

    /// <summary>
    /// The highest generation an extent read may report: a writer's own (it fenced out every higher
    /// one), a reader's the highest the Hello reply reported.
    /// </summary>
    private readonly ulong _generationLimit;

    /// <summary>Cancelled once the link has failed or been disposed: releases callers waiting for a send slot.</summary>
    private readonly CancellationTokenSource _closed = new();
    private Exception? _failure;
    private long _internalIds;
    private long _lastSend;

    private DownstairsClient(Stream stream, FrameSender sender, PipeReader reader, HelloReply region, DownstairsClientOptions options, ulong generationLimit)
    {
        _generationLimit = generationLimit;
        _stream = stream;
        _sender = sender;
        Region = region;
        _maxFrameBytes = options.MaxFrameBytes;
        _slots = new SemaphoreSlim(Math.Max(1, Math.Min(options.MaxInFlightJobs, region.MaxJobs)));
        _receiveLoop = Task.Run(() => ReceiveLoopAsync(reader));
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

    /// <summary>Completes when the connection ends (the receive loop stops).</summary>
    public Task Completion => _receiveLoop;

    /// <summary>Why the connection ended, if it did.</summary>
    public Exception? Failure => Volatile.Read(ref _failure);

    public int InFlight => _pending.Count;

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

    // ------------------------------------------------------------------ operations

    /// <summary>
    /// Writes whole blocks starting at <paramref name="firstBlock"/>. <paramref name="hashes"/>: one
    /// 8-byte little-endian <see cref="BlockContext.Hash"/> per block, or empty to have them computed.
    /// </summary>
    public Task<DownstairsResult> WriteAsync(ulong jobId, long firstBlock, ReadOnlyMemory<byte> data, ReadOnlyMemory<byte> hashes = default, CancellationToken cancellationToken = default)
    {
        int count = BlockCount(data.Length);
        if (hashes.IsEmpty)
        {
            byte[] computed = new byte[count * Wire.HashSize];
            BlockContext.HashBlocks(data.Span, BlockSize, computed);
            hashes = computed;
        }
        else if (hashes.Length != count * Wire.HashSize)
        {
            throw new ArgumentException($"{hashes.Length} bytes of hashes for {count} blocks", nameof(hashes));
        }
        var range = new BlockRange(firstBlock, count);
        return SendAsync(new Pending(MessageType.WriteReply), jobId,
            () => OutgoingFrame.Create(MessageType.Write, ResultCode.Ok, jobId, BlockRange.FixedSize, range, static (d, r) => r.Write(d), hashes, data), cancellationToken);
    }

    /// <summary>Reads <c>data.Length / BlockSize</c> blocks into <paramref name="data"/> and their stored hashes (0 = never written) into <paramref name="hashes"/> (may be empty).</summary>
    public Task<DownstairsResult> ReadAsync(ulong jobId, long firstBlock, Memory<byte> data, Memory<byte> hashes = default, CancellationToken cancellationToken = default)
    {
        int count = BlockCount(data.Length);
        if (!hashes.IsEmpty && hashes.Length != count * Wire.HashSize)
        {
            throw new ArgumentException($"{hashes.Length} bytes of hashes for {count} blocks", nameof(hashes));
        }
        var range = new BlockRange(firstBlock, count);
        return SendAsync(new Pending(MessageType.ReadReply) { Count = count, Destination1 = hashes, Destination2 = data }, jobId,
            () => OutgoingFrame.Create(MessageType.Read, ResultCode.Ok, jobId, BlockRange.FixedSize, range, static (d, r) => r.Write(d)), cancellationToken);
    }

    /// <summary>Makes every write answered before it durable and records (generation, flush number) on the dirty extents.</summary>
    public Task<DownstairsResult> FlushAsync(ulong jobId, ulong flushNumber, ulong generation, CancellationToken cancellationToken = default) =>
        SendAsync(new Pending(MessageType.FlushReply), jobId,
            () => OutgoingFrame.Create(MessageType.Flush, ResultCode.Ok, jobId, FlushRequest.BodySize, (flushNumber, generation), static (d, f) =>
            {
                BinaryPrimitives.WriteUInt64LittleEndian(d, f.flushNumber);
                BinaryPrimitives.WriteUInt64LittleEndian(d[8..], f.generation);
            }), cancellationToken);

    /// <summary>Round trip on the link (bypasses the IO queue); uses an internal job id.</summary>
    public async Task<TimeSpan> PingAsync(CancellationToken cancellationToken = default)
    {
        ulong id = InternalIdBase + (ulong)Interlocked.Increment(ref _internalIds);
        long start = System.Diagnostics.Stopwatch.GetTimestamp();
        DownstairsResult r = await SendAsync(new Pending(MessageType.PingReply), id,
            () => OutgoingFrame.Create(MessageType.Ping, ResultCode.Ok, id, 8, id, static (d, n) => BinaryPrimitives.WriteUInt64LittleEndian(d, n)), cancellationToken).ConfigureAwait(false);
        if (!r.IsOk)
        {
            throw new DownstairsConnectionException($"ping failed: {r}");
        }
        return System.Diagnostics.Stopwatch.GetElapsedTime(start);
    }

    /// <summary>Live repair, source side: blocks [first, first+count) of one extent as stored, with their 16-byte contexts, and the extent's metadata.</summary>
    public async Task<ExtentReadResult> ReadExtentAsync(ulong jobId, ExtentRange range, Memory<byte> contexts, Memory<byte> data, CancellationToken cancellationToken = default)
    {
        CheckExtentBuffers(range, contexts.Length, data.Length);
        var pending = new Pending(MessageType.ExtentReadReply) { Count = range.BlockCount, Destination1 = contexts, Destination2 = data };
        DownstairsResult r = await SendAsync(pending, jobId,
            () => OutgoingFrame.Create(MessageType.ExtentRead, ResultCode.Ok, jobId, ExtentRange.FixedSize, range, static (d, x) => x.Write(d)), cancellationToken).ConfigureAwait(false);
        return new ExtentReadResult(r, pending.Meta);
    }

    /// <summary>Live repair, target side: stage part of a healthy copy (set <see cref="ExtentRange.BeginFlag"/> on the first chunk).</summary>
    public Task<DownstairsResult> WriteExtentAsync(ulong jobId, ExtentRange range, ReadOnlyMemory<byte> contexts, ReadOnlyMemory<byte> data, CancellationToken cancellationToken = default)
    {
        CheckExtentBuffers(range, contexts.Length, data.Length);
        return SendAsync(new Pending(MessageType.ExtentWriteReply), jobId,
            () => OutgoingFrame.Create(MessageType.ExtentWrite, ResultCode.Ok, jobId, ExtentRange.FixedSize, range, static (d, x) => x.Write(d), contexts, data), cancellationToken);
    }

    /// <summary>Live repair: replace the extent by its staged copy (unsent blocks read as unwritten) and record <paramref name="meta"/>.</summary>
    public Task<DownstairsResult> CommitExtentAsync(ulong jobId, int extent, ExtentMeta meta, CancellationToken cancellationToken = default) =>
        SendAsync(new Pending(MessageType.ExtentCommitReply), jobId,
            () => OutgoingFrame.Create(MessageType.ExtentCommit, ResultCode.Ok, jobId, ExtentCommitRequest.BodySize, (extent, meta), static (d, c) =>
            {
                BinaryPrimitives.WriteInt32LittleEndian(d, c.extent);
                BinaryPrimitives.WriteUInt32LittleEndian(d[4..], c.meta.Dirty ? ExtentMeta.DirtyFlag : 0);
                BinaryPrimitives.WriteUInt64LittleEndian(d[8..], c.meta.Generation);
                BinaryPrimitives.WriteUInt64LittleEndian(d[16..], c.meta.FlushNumber);
            }), cancellationToken);

    /// <summary>Live repair, target side: these extents are stale until their copy is committed; flushes must not stamp them.</summary>
    public Task<DownstairsResult> MarkRepairPendingAsync(ulong jobId, IReadOnlyList<int> extents, CancellationToken cancellationToken = default) =>
        SendAsync(new Pending(MessageType.ExtentsPendingReply), jobId,
            () => OutgoingFrame.Create(MessageType.ExtentsPending, ResultCode.Ok, jobId, ExtentsPendingRequest.BodySize(extents.Count), extents,
                static (d, x) => ExtentsPendingRequest.Write(d, x)), cancellationToken);

    // ------------------------------------------------------------------ plumbing

    private int BlockCount(int bytes)
    {
        if (bytes <= 0 || bytes % BlockSize != 0)
        {
            throw new ArgumentException($"{bytes} bytes is not a positive whole number of {BlockSize}-byte blocks");
        }
        return bytes / BlockSize;
    }

    private void CheckExtentBuffers(ExtentRange range, int contextBytes, int dataBytes)
    {
        if (contextBytes != range.BlockCount * BlockContext.Size || dataBytes != range.BlockCount * BlockSize)
        {
            throw new ArgumentException($"buffers of {contextBytes} context and {dataBytes} data bytes for {range.BlockCount} blocks");
        }
    }

    private async Task<DownstairsResult> SendAsync(Pending pending, ulong jobId, Func<OutgoingFrame> build, CancellationToken cancellationToken)
    {
        ThrowIfFailed();
        await WaitForSlotAsync(cancellationToken).ConfigureAwait(false);
        if (!_pending.TryAdd(jobId, pending))
        {
            _slots.Release();
            throw new ArgumentException($"job {jobId} is already in flight on this connection", nameof(jobId));
        }
        // The receive loop may have ended between the check above and TryAdd: fail rather than hang.
        if (Failure is { } failure)
        {
            Fail(jobId, failure);
        }
        else
        {
            Volatile.Write(ref _lastSend, System.Diagnostics.Stopwatch.GetTimestamp());
            _sender.Enqueue(build());
        }
        return await pending.Task.ConfigureAwait(false);
    }

    /// <summary>
    /// A send slot, or a <see cref="DownstairsConnectionException"/> once the link fails: a peer that
    /// stops answering (or announced a tiny job limit) must not leave callers waiting forever.
    /// </summary>
    private async Task WaitForSlotAsync(CancellationToken cancellationToken)
    {
        if (_slots.Wait(0, CancellationToken.None))
        {
            return;
        }
        using CancellationTokenSource? linked = cancellationToken.CanBeCanceled ? CancellationTokenSource.CreateLinkedTokenSource(cancellationToken, _closed.Token) : null;
        try
        {
            await _slots.WaitAsync(linked?.Token ?? _closed.Token).ConfigureAwait(false);
        }
        catch (OperationCanceledException) when (_closed.IsCancellationRequested && !cancellationToken.IsCancellationRequested)
        {
            ThrowIfFailed();
            throw;
        }
    }

    private async Task ReceiveLoopAsync(PipeReader reader)
    {
        Exception failure = new DownstairsConnectionException("downstairs closed the connection");
        try
        {
            while (true)
            {
                ReadResult result = await reader.ReadAsync().ConfigureAwait(false);
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
            await _closed.CancelAsync().ConfigureAwait(false);
            _sender.Complete();
            await reader.CompleteAsync().ConfigureAwait(false);
            await _stream.DisposeAsync().ConfigureAwait(false);
            foreach (ulong id in _pending.Keys)
            {
                Fail(id, Failure!);
            }
        }
    }

    private void Complete(FrameHeader header, ReadOnlySequence<byte> body)
    {
        if (!_pending.TryRemove(header.JobId, out Pending? pending))
        {
            throw new DownstairsProtocolException($"reply {header.Type} for job {header.JobId}, which is not in flight");
        }
        // Every reply frees its send slot, whatever its outcome.
        using var release = new SlotRelease(_slots);
        try
        {
            if (header.Type != pending.ReplyType)
            {
                throw new DownstairsProtocolException($"job {header.JobId}: got {header.Type}, expected {pending.ReplyType}");
            }
            if (header.Result != ResultCode.Ok)
            {
                ErrorBody error = ErrorBody.Parse(body);
                pending.SetResult(new DownstairsResult(header.Result, error.Errno, error.Message));
                return;
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
            pending.SetResult(DownstairsResult.Ok);
        }
        catch (DownstairsProtocolException e)
        {
            pending.SetException(new DownstairsConnectionException($"invalid reply from downstairs: {e.Message}", e));
            throw;
        }
    }

    private readonly struct SlotRelease(SemaphoreSlim slots) : IDisposable
    {
        public void Dispose() => slots.Release();
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

    private void Fail(ulong jobId, Exception failure)
    {
        if (_pending.TryRemove(jobId, out Pending? pending))
        {
            pending.SetException(failure);
            _slots.Release();
        }
    }

    private void ThrowIfFailed()
    {
        if (Failure is { } f)
        {
            throw new DownstairsConnectionException(f.Message, f);
        }
    }

    public async ValueTask DisposeAsync()
    {
        Interlocked.CompareExchange(ref _failure, new DownstairsConnectionException("client disposed"), null);
        if (_pinger is not null)
        {
            await _pinger.DisposeAsync().ConfigureAwait(false);
        }
        await _closed.CancelAsync().ConfigureAwait(false);
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
        await _receiveLoop.ConfigureAwait(ConfigureAwaitOptions.SuppressThrowing);
        // _slots and _closed are not disposed: a caller racing with dispose may still touch them, and
        // neither holds a kernel handle (no AvailableWaitHandle, no timer).
    }

    private sealed class Pending(MessageType replyType)
    {
        private readonly TaskCompletionSource<DownstairsResult> _tcs = new(TaskCreationOptions.RunContinuationsAsynchronously);

        public MessageType ReplyType { get; } = replyType;

        public int Count { get; init; }

        public Memory<byte> Destination1 { get; init; }

        public Memory<byte> Destination2 { get; init; }

        public ExtentMeta Meta { get; set; }

        public Task<DownstairsResult> Task => _tcs.Task;

        public void SetResult(DownstairsResult result) => _tcs.TrySetResult(result);

        public void SetException(Exception e) => _tcs.TrySetException(e);
    }
}
