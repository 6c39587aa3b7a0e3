using System.Buffers;
using System.Diagnostics;
using System.Threading.Channels;
using Microsoft.Extensions.Logging;
using NbdServer.Common.Logging;
using NbdServer.Common.Tls;
using NbdServer.Common.Volumes;
using NbdServer.Nbd;

namespace NbdServer.Frontend.Server;

/// <summary>
/// One client connection: handshake, then the transmission phase. Requests are read in order by one
/// loop and run concurrently; replies go out as they complete, batched by one writer (one gather send
/// per batch). Memory is bounded: a request is admitted only when its payload fits the connection's
/// and the server's byte budgets, so at the cap we simply stop reading the socket.
/// </summary>
internal sealed class NbdConnection : IAsyncDisposable
{
    private const int MaxRepliesPerBatch = 128;
    private const int HeaderBufferSize = 64;

    /// <summary>What an error reply is charged: the largest one (structured header, errno, length, message).</summary>
    private const int ErrorReplyCharge = NbdReplyWriter.MaxErrorChunkSize;

    /// <summary>
    /// What a WRITE_ZEROES is charged: volumes zero a long range in pieces of at most this size (the
    /// replicated volume sends 4 MiB writes of zeroes), so that is what one request holds at a time.
    /// </summary>
    private const int WriteZeroesCharge = 4 << 20;

    private readonly Transport _transport;
    private readonly ExportRegistry _exports;
    private readonly FrontendOptions _options;
    private readonly ByteBudget _serverBudget;
    private readonly ByteBudget _connectionBudget;
    private readonly SemaphoreSlim _requestSlots;
    private readonly ILogger _logger;
    private readonly LogThrottle? _throttle;
    private readonly TlsServerPolicy? _tls;
    private readonly Channel<PendingReply> _replies;
    private readonly CancellationTokenSource _aborted = new();

    // Re-armed per payload / per send, so the deadlines cost no allocation per request.
    private readonly Deadline _payloadDeadline;
    private readonly Deadline _sendDeadline;
    private readonly byte[] _requestHeader = new byte[NbdRequest.Size];
    private readonly Lock _inFlightLock = new();
    private TaskCompletionSource? _idle;
    private int _inFlight;
    private volatile bool _shuttingDown;
    private NegotiatedSession? _session;

    public NbdConnection(long id, Transport transport, ExportRegistry exports, FrontendOptions options, ByteBudget serverBudget, ILogger logger, LogThrottle? throttle = null, TlsServerPolicy? tls = null, TimeProvider? time = null)
    {
        _tls = tls;
        Id = id;
        _transport = transport;
        _exports = exports;
        _options = options;
        _serverBudget = serverBudget;
        _connectionBudget = new ByteBudget(options.MaxInFlightBytesPerConnection);
        _requestSlots = new SemaphoreSlim(options.MaxInFlightRequestsPerConnection);
        // Every reply holds a request slot until it is sent, so the queue never holds more than there
        // are slots: a client that pipelines requests and never reads stops being read instead.
        _replies = Channel.CreateBounded<PendingReply>(new BoundedChannelOptions(options.MaxInFlightRequestsPerConnection) { SingleReader = true, FullMode = BoundedChannelFullMode.Wait });
        _payloadDeadline = new Deadline(_aborted.Token, time ?? TimeProvider.System);
        _sendDeadline = new Deadline(_aborted.Token, time ?? TimeProvider.System);
        _logger = logger;
        _throttle = throttle;
    }

    public long Id { get; }

    /// <summary>Requests received and not yet answered.</summary>
    public int InFlight => Volatile.Read(ref _inFlight);

    /// <summary>Runs the connection to its end. Never throws: failures close this connection only.</summary>
    public async Task RunAsync(CancellationToken serverStopping)
    {
        string reason = "client disconnected";
        Task? writer = null;
        try
        {
            using (var handshakeTimeout = CancellationTokenSource.CreateLinkedTokenSource(_aborted.Token, serverStopping))
            {
                handshakeTimeout.CancelAfter(_options.HandshakeTimeout);
                var negotiator = new NbdNegotiator(_transport, _exports, _options, Id, _logger, () => _shuttingDown || serverStopping.IsCancellationRequested, _tls, _throttle);
                try
                {
                    _session = await negotiator.NegotiateAsync(handshakeTimeout.Token);
                }
                catch (OperationCanceledException) when (!_aborted.IsCancellationRequested)
                {
                    reason = serverStopping.IsCancellationRequested ? "server shutting down during handshake" : $"handshake not finished within {_options.HandshakeTimeout.TotalSeconds:0} s";
                    if (!serverStopping.IsCancellationRequested)
                    {
                        ReportDropped("handshake not finished within the handshake timeout", reason);
                    }
                    return;
                }
            }
            if (_session is null)
            {
                reason = "handshake ended without an export";
                return;
            }
            FrontendLog.Attached(_logger, Id, _transport.RemoteEndPoint, _session.Export.Name, _session.StructuredReplies, _session.BaseAllocation, _transport.Tls is not null);
            FrontendMetrics.ConnectionAttached();
            writer = Task.Run(WriteRepliesAsync);
            try
            {
                reason = await ReadRequestsAsync();
            }
            catch (OperationCanceledException) when (_payloadDeadline.Expired)
            {
                reason = $"write payload not received within {_options.PayloadTimeout.TotalSeconds:0.#} s";
                ReportTooSlow("a WRITE payload was not complete within the payload timeout", reason);
                Abort();
            }
        }
        catch (Exception e) when (e is IOException or EndOfStreamException or OperationCanceledException or ObjectDisposedException)
        {
            reason = e is OperationCanceledException ? "closed by server" : $"connection lost ({e.Message})";
        }
        catch (Exception e)
        {
            FrontendLog.Unexpected(_logger, Id, e);
            reason = "internal error";
        }
        finally
        {
            // Answer what was admitted before closing (DISC and shutdown both require the drain).
            await WhenIdleAsync().WaitAsync(_options.ShutdownTimeout).ContinueWith(static _ => { }, TaskScheduler.Default);
            _replies.Writer.TryComplete();
            if (writer is not null)
            {
                await writer;
            }
            _transport.Abort();
            if (_session is not null)
            {
                FrontendMetrics.ConnectionDetached();
            }
            if (_session is not null)
            {
                FrontendLog.ConnectionClosed(_logger, Id, reason);
            }
            else
            {
                // A connection that never attached was either an honest probe (LIST, INFO) or a
                // stranger; its drop, if any, was logged through the throttle. One line each would
                // let anyone who can connect flood the log.
                FrontendLog.UnattachedConnectionClosed(_logger, Id, reason);
            }
        }
    }

    /// <summary>Stop taking work: new requests get ESHUTDOWN; completes once in-flight requests are answered.</summary>
    public Task BeginShutdownAsync()
    {
        _shuttingDown = true;
        return WhenIdleAsync();
    }

    /// <summary>Hard disconnect (after the shutdown grace period).</summary>
    public void Abort()
    {
        _aborted.Cancel();
        _transport.Abort();
    }

    public async ValueTask DisposeAsync()
    {
        await _transport.DisposeAsync();
        _payloadDeadline.Dispose();
        _sendDeadline.Dispose();
        _aborted.Dispose();
        _requestSlots.Dispose();
    }

    private async Task<string> ReadRequestsAsync()
    {
        CancellationToken cancellationToken = _aborted.Token;
        NegotiatedSession session = _session!;
        while (true)
        {
            if (!await _transport.Input.ReadExactlyAsync(_requestHeader, cancellationToken))
            {
                return "client closed the connection";
            }
            NbdRequest request = NbdRequest.Parse(_requestHeader);
            if (request.Magic != NbdMagic.Request)
            {
                // Without a valid magic we cannot find the next request boundary: hard disconnect.
                ReportDropped("bad request magic", $"magic 0x{request.Magic:x8}");
                return "protocol violation";
            }
            if (request.Command == NbdCommand.Disconnect)
            {
                return "client sent NBD_CMD_DISC";
            }

            uint payloadLength = request.Command == NbdCommand.Write ? request.Length : 0;
            (NbdError error, string message) = _shuttingDown ? (NbdError.ESHUTDOWN, "server is shutting down") : Validate(request, session);
            if (error != NbdError.None)
            {
                // The payload is still on the wire: drop it so the next header lines up. It is not
                // buffered, so it holds no budget, but it gets the same deadline as any payload.
                await _transport.Input.SkipAsync(payloadLength, _payloadDeadline.Arm(_options.PayloadTimeout));
                _payloadDeadline.Disarm();
                ReportFailure(request, error, message);
                FrontendMetrics.Record(request.Command, request.Length, ok: false, Stopwatch.GetTimestamp());
                // An error reply is a reply like any other: it waits for a slot and its bytes, so a
                // client that sends bad requests and never reads is throttled like one sending good ones.
                long errorCharge = _connectionBudget.Clamp(ErrorReplyCharge);
                await AdmitAsync(errorCharge, cancellationToken);
                BeginRequest();
                Enqueue(ErrorReply(request, error, message, errorCharge));
                continue;
            }

            long charge = request.Command switch
            {
                NbdCommand.Read or NbdCommand.Write => _connectionBudget.Clamp(request.Length),
                NbdCommand.WriteZeroes => _connectionBudget.Clamp(Math.Min(request.Length, WriteZeroesCharge)),
                // Its reply is built in memory: charged for the most descriptors it may carry.
                NbdCommand.BlockStatus => _connectionBudget.Clamp(NbdReplyWriter.BlockStatusChunkSize(_options.MaxBlockStatusExtents)),
                _ => 0,
            };
            await AdmitAsync(charge, cancellationToken);
            BeginRequest();

            byte[]? payload = null;
            if (payloadLength > 0)
            {
                payload = ArrayPool<byte>.Shared.Rent((int)payloadLength);
                bool complete = false;
                try
                {
                    // The write holds its budget while its payload arrives: a deadline, so a client
                    // that stops half-way cannot keep it (and starve the other connections) forever.
                    complete = await _transport.Input.ReadExactlyAsync(payload.AsMemory(0, (int)payloadLength), _payloadDeadline.Arm(_options.PayloadTimeout));
                    _payloadDeadline.Disarm();
                }
                finally
                {
                    if (!complete)
                    {
                        // A torn write is never applied; give back what it was admitted with.
                        ArrayPool<byte>.Shared.Return(payload);
                        Settle(new PendingReply(RentHeader(0), 0, null, 0, charge, HoldsSlot: true));
                    }
                }
                if (!complete)
                {
                    return "client closed the connection in the middle of a write";
                }
            }
            _ = ExecuteAsync(request, payload, charge, session);
        }
    }

    /// <summary>Takes a request slot and <paramref name="charge"/> bytes of the connection's and the server's budgets.</summary>
    private async ValueTask AdmitAsync(long charge, CancellationToken cancellationToken)
    {
        await _requestSlots.WaitAsync(cancellationToken);
        await _connectionBudget.AcquireAsync(charge, cancellationToken);
        await _serverBudget.AcquireAsync(_serverBudget.Clamp(charge), cancellationToken);
    }

    /// <summary>
    /// A client closed for not keeping up (payload or send deadline): one throttled line for all
    /// connections, so many slow clients are a count, not a flood.
    /// </summary>
    private void ReportTooSlow(string what, string reason)
    {
        string remote = _transport.RemoteEndPoint;
        if (_throttle is null)
        {
            FrontendLog.ClientTooSlow(_logger, Id, remote, reason);
            return;
        }
        _throttle.Report(LogLevel.Warning, $"NBD client closed: {what}", () => $"first: connection {Id} from {remote}, {reason}; its budget was returned");
    }

    /// <summary>A connection dropped for a protocol violation: throttled by kind, like the handshake's drops.</summary>
    private void ReportDropped(string kind, string detail)
    {
        string remote = _transport.RemoteEndPoint;
        if (_throttle is null)
        {
            FrontendLog.ProtocolViolation(_logger, Id, remote, $"{kind} ({detail})");
            return;
        }
        _throttle.Report(LogLevel.Warning, $"NBD client dropped: {kind}", () => $"first: connection {Id} from {remote}, {detail}");
    }

    /// <summary>Checks a request against the spec and the export; (None, "") if it may run.</summary>
    private (NbdError Error, string Message) Validate(in NbdRequest request, NegotiatedSession session)
    {
        IBlockVolume volume = session.Export.Volume;
        ulong size = (ulong)volume.Size;
        bool inRange = request.Offset <= size && request.Length <= size - request.Offset;
        CommandFlags allowed = CommandFlags.Fua;
        switch (request.Command)
        {
            case NbdCommand.Read:
                allowed |= session.StructuredReplies ? CommandFlags.DontFragment : CommandFlags.None;
                if ((request.Flags & ~allowed) != 0)
                {
                    return (NbdError.EINVAL, $"flags 0x{(ushort)request.Flags:x} are not valid for READ");
                }
                if (request.Length > _options.MaxPayloadBytes)
                {
                    // With DF the spec's answer to "too large to send unfragmented" is EOVERFLOW.
                    return ((request.Flags & CommandFlags.DontFragment) != 0 ? NbdError.EOVERFLOW : NbdError.EINVAL,
                        $"read of {request.Length} bytes exceeds the maximum of {_options.MaxPayloadBytes}");
                }
                return inRange ? default : (NbdError.EINVAL, $"read beyond the end of the export ({size} bytes)");
            case NbdCommand.Write:
                if ((request.Flags & ~allowed) != 0)
                {
                    return (NbdError.EINVAL, $"flags 0x{(ushort)request.Flags:x} are not valid for WRITE");
                }
                if (session.Export.IsReadOnly)
                {
                    return (NbdError.EPERM, "export is read-only");
                }
                if (request.Length > _options.MaxPayloadBytes)
                {
                    return (NbdError.EINVAL, $"write of {request.Length} bytes exceeds the maximum of {_options.MaxPayloadBytes}");
                }
                return inRange ? default : (NbdError.ENOSPC, $"write beyond the end of the export ({size} bytes)");
            case NbdCommand.Flush:
                if ((request.Flags & ~allowed) != 0)
                {
                    return (NbdError.EINVAL, $"flags 0x{(ushort)request.Flags:x} are not valid for FLUSH");
                }
                if ((volume.Features & VolumeFeatures.Flush) == 0)
                {
                    return (NbdError.EINVAL, "flush is not supported by this export");
                }
                return request.Offset == 0 && request.Length == 0 ? default : (NbdError.EINVAL, "FLUSH must have offset and length 0");
            case NbdCommand.Trim:
                if ((request.Flags & ~allowed) != 0)
                {
                    return (NbdError.EINVAL, $"flags 0x{(ushort)request.Flags:x} are not valid for TRIM");
                }
                if (session.Export.IsReadOnly)
                {
                    return (NbdError.EPERM, "export is read-only");
                }
                if ((session.Flags & TransmissionFlags.SendTrim) == 0)
                {
                    return (NbdError.EINVAL, "trim is not supported by this export");
                }
                return inRange ? default : (NbdError.EINVAL, $"trim beyond the end of the export ({size} bytes)");
            case NbdCommand.WriteZeroes:
                allowed |= CommandFlags.NoHole | CommandFlags.FastZero;
                if ((request.Flags & ~allowed) != 0)
                {
                    return (NbdError.EINVAL, $"flags 0x{(ushort)request.Flags:x} are not valid for WRITE_ZEROES");
                }
                if (session.Export.IsReadOnly)
                {
                    return (NbdError.EPERM, "export is read-only");
                }
                if ((session.Flags & TransmissionFlags.SendWriteZeroes) == 0)
                {
                    return (NbdError.EINVAL, "write zeroes is not supported by this export");
                }
                if ((request.Flags & CommandFlags.FastZero) != 0 && (session.Flags & TransmissionFlags.SendFastZero) == 0)
                {
                    return (NbdError.ENOTSUP, "fast zero is not supported by this export");
                }
                return inRange ? default : (NbdError.ENOSPC, $"write zeroes beyond the end of the export ({size} bytes)");
            case NbdCommand.Cache:
                if ((request.Flags & ~allowed) != 0)
                {
                    return (NbdError.EINVAL, $"flags 0x{(ushort)request.Flags:x} are not valid for CACHE");
                }
                return inRange ? default : (NbdError.EINVAL, $"cache beyond the end of the export ({size} bytes)");
            case NbdCommand.BlockStatus:
                allowed |= CommandFlags.RequestOne;
                if ((request.Flags & ~allowed) != 0)
                {
                    return (NbdError.EINVAL, $"flags 0x{(ushort)request.Flags:x} are not valid for BLOCK_STATUS");
                }
                if (!session.BaseAllocation)
                {
                    return (NbdError.EINVAL, "no metadata context was negotiated");
                }
                if (request.Length == 0)
                {
                    return (NbdError.EINVAL, "block status of zero bytes");
                }
                return inRange ? default : (NbdError.EINVAL, $"block status beyond the end of the export ({size} bytes)");
            default:
                return (NbdError.EINVAL, $"unknown command {(ushort)request.Command}");
        }
    }

    private async Task ExecuteAsync(NbdRequest request, byte[]? payload, long charge, NegotiatedSession session)
    {
        IBlockVolume volume = session.Export.Volume;
        CancellationToken cancellationToken = _aborted.Token;
        var writeOptions = (request.Flags & CommandFlags.Fua) != 0 ? WriteOptions.ForceUnitAccess : WriteOptions.None;
        long offset = (long)request.Offset;
        long started = Stopwatch.GetTimestamp();
        bool ok = false;
        try
        {
            switch (request.Command)
            {
                case NbdCommand.Read:
                    {
                        byte[] data = ArrayPool<byte>.Shared.Rent(Math.Max(1, (int)request.Length));
                        try
                        {
                            await volume.ReadAsync(offset, data.AsMemory(0, (int)request.Length), cancellationToken);
                        }
                        catch
                        {
                            ArrayPool<byte>.Shared.Return(data);
                            throw;
                        }
                        ok = true;
                        Enqueue(ReadReply(request, data, charge, session.StructuredReplies));
                        return;
                    }
                case NbdCommand.Write:
                    try
                    {
                        await volume.WriteAsync(offset, payload.AsMemory(0, (int)request.Length), writeOptions, cancellationToken);
                    }
                    finally
                    {
                        if (payload is not null)
                        {
                            ArrayPool<byte>.Shared.Return(payload);
                        }
                    }
                    break;
                case NbdCommand.Flush:
                    await volume.FlushAsync(cancellationToken);
                    break;
                case NbdCommand.Trim:
                    await volume.TrimAsync(offset, request.Length, writeOptions, cancellationToken);
                    break;
                case NbdCommand.WriteZeroes:
                    if ((request.Flags & CommandFlags.NoHole) != 0)
                    {
                        writeOptions |= WriteOptions.NoHole;
                    }
                    if ((request.Flags & CommandFlags.FastZero) != 0)
                    {
                        writeOptions |= WriteOptions.FastZero;
                    }
                    await volume.WriteZeroesAsync(offset, request.Length, writeOptions, cancellationToken);
                    break;
                case NbdCommand.Cache:
                    // Prefetch is only a hint: our volumes have no cache to warm, so success is honest.
                    break;
                case NbdCommand.BlockStatus:
                    {
                        int max = (request.Flags & CommandFlags.RequestOne) != 0 ? 1 : _options.MaxBlockStatusExtents;
                        IReadOnlyList<AllocationExtent> extents = await volume.GetAllocationAsync(offset, request.Length, max, cancellationToken);
                        ok = true;
                        Enqueue(BlockStatusReply(request, extents, max, charge));
                        return;
                    }
            }
            ok = true;
            Enqueue(SuccessReply(request, charge));
        }
        catch (VolumeException e)
        {
            NbdError error = e.Error switch
            {
                VolumeError.NoSpace => NbdError.ENOSPC,
                VolumeError.NotSupported => NbdError.ENOTSUP,
                VolumeError.ReadOnly => NbdError.EPERM,
                VolumeError.InvalidArgument => NbdError.EINVAL,
                VolumeError.Shutdown => NbdError.ESHUTDOWN,
                _ => NbdError.EIO,
            };
            if (e.Error != VolumeError.NotSupported)
            {
                ReportFailure(request, error, e.Message);
            }
            Enqueue(ErrorReply(request, error, e.Message, charge));
        }
        catch (OperationCanceledException)
        {
            Enqueue(ErrorReply(request, NbdError.ESHUTDOWN, "connection is closing", charge));
        }
        catch (Exception e)
        {
            FrontendLog.Unexpected(_logger, Id, e);
            Enqueue(ErrorReply(request, NbdError.EIO, "internal error", charge));
        }
        finally
        {
            FrontendMetrics.Record(request.Command, request.Length, ok, started);
        }
    }

    /// <summary>
    /// A failed request, logged through the throttle: a client that sends garbage in a loop, or a
    /// volume that fails every write, is a first line with details and then one count per interval
    /// per (command, error) — never a line per request. The key holds nothing a client chooses
    /// freely (not its connection, not an unknown command's number): otherwise one client could fill
    /// the throttle's table and push every other error, a failing volume's included, into its
    /// overflow count.
    /// </summary>
    private void ReportFailure(in NbdRequest request, NbdError error, string message)
    {
        string command = Enum.IsDefined(request.Command) ? request.Command.ToString() : "unknown command";
        if (_throttle is null)
        {
            FrontendLog.CommandFailed(_logger, Id, command, request.Offset, request.Length, error.ToString(), message);
            return;
        }
        (ulong offset, uint length, ushort code) = (request.Offset, request.Length, (ushort)request.Command);
        _throttle.Report(LogLevel.Warning, $"NBD request failed: {command} with {error}", () => $"first: connection {Id}, command {code} at offset {offset} length {length}: {message}");
    }

    private PendingReply SuccessReply(in NbdRequest request, long charge)
    {
        byte[] header = RentHeader(NbdReplyWriter.SimpleReplySize);
        int length = NbdReplyWriter.WriteSimple(header, request.Cookie, NbdError.None);
        return new PendingReply(header, length, null, 0, charge, HoldsSlot: true);
    }

    private PendingReply ReadReply(in NbdRequest request, byte[] data, long charge, bool structured)
    {
        byte[] header = RentHeader(NbdReplyWriter.OffsetDataHeaderSize);
        if (!structured)
        {
            int simple = NbdReplyWriter.WriteSimple(header, request.Cookie, NbdError.None);
            return new PendingReply(header, simple, data, (int)request.Length, charge, true);
        }
        if (request.Length == 0)
        {
            // An OFFSET_DATA chunk must carry at least one byte; an empty read is just "done".
            ArrayPool<byte>.Shared.Return(data);
            int done = NbdReplyWriter.WriteDone(header, request.Cookie);
            return new PendingReply(header, done, null, 0, charge, true);
        }
        // One OFFSET_DATA chunk for the whole read, so DF is always honoured.
        int length = NbdReplyWriter.WriteOffsetDataHeader(header, ReplyFlags.Done, request.Cookie, request.Offset, request.Length);
        return new PendingReply(header, length, data, (int)request.Length, charge, true);
    }

    private static PendingReply BlockStatusReply(in NbdRequest request, IReadOnlyList<AllocationExtent> extents, int max, long charge)
    {
        int count = Math.Min(Math.Max(extents.Count, 1), max);
        BlockStatusDescriptor[] descriptors = ArrayPool<BlockStatusDescriptor>.Shared.Rent(count);
        try
        {
            long remaining = request.Length;
            int written = 0;
            for (int i = 0; i < count && remaining > 0; i++)
            {
                AllocationExtent extent = extents.Count > 0 ? extents[i] : new AllocationExtent(remaining, AllocationState.Data);
                uint length = (uint)Math.Min(Math.Min(extent.Length, remaining), uint.MaxValue);
                if (length == 0)
                {
                    break;
                }
                uint state = ((extent.State & AllocationState.Hole) != 0 ? MetaContexts.StateHole : 0)
                    | ((extent.State & AllocationState.Zero) != 0 ? MetaContexts.StateZero : 0);
                descriptors[written++] = new BlockStatusDescriptor(length, state);
                remaining -= length;
            }
            if (written == 0)
            {
                // The spec requires at least one descriptor; "data" is always a safe answer.
                descriptors[written++] = new BlockStatusDescriptor(request.Length, 0);
            }
            byte[] header = RentHeader(NbdReplyWriter.BlockStatusChunkSize(written));
            int size = NbdReplyWriter.WriteBlockStatus(header, request.Cookie, MetaContexts.BaseAllocationId, descriptors.AsSpan(0, written));
            return new PendingReply(header, size, null, 0, charge, true);
        }
        finally
        {
            ArrayPool<BlockStatusDescriptor>.Shared.Return(descriptors);
        }
    }

    private PendingReply ErrorReply(in NbdRequest request, NbdError error, string message, long charge)
    {
        byte[] header = RentHeader(NbdReplyWriter.MaxErrorChunkSize);
        int length = _session is { StructuredReplies: true }
            ? NbdReplyWriter.WriteError(header, request.Cookie, error, message)
            : NbdReplyWriter.WriteSimple(header, request.Cookie, error);
        return new PendingReply(header, length, null, 0, charge, HoldsSlot: true);
    }

    private static byte[] RentHeader(int size) => ArrayPool<byte>.Shared.Rent(Math.Max(size, HeaderBufferSize));

    private void Enqueue(PendingReply reply)
    {
        // Never full: every queued reply holds one of the request slots the queue is sized for.
        if (!_replies.Writer.TryWrite(reply))
        {
            // The writer is gone (connection closed): nothing will send it, so settle it here.
            Settle(reply);
        }
    }

    /// <summary>The single writer: drains whatever replies are ready and sends them in one gather write.</summary>
    private async Task WriteRepliesAsync()
    {
        var batch = new List<PendingReply>(MaxRepliesPerBatch);
        var segments = new List<ArraySegment<byte>>(MaxRepliesPerBatch * 2);
        bool broken = false;
        ChannelReader<PendingReply> reader = _replies.Reader;
        while (await reader.WaitToReadAsync())
        {
            while (batch.Count < MaxRepliesPerBatch && reader.TryRead(out PendingReply reply))
            {
                batch.Add(reply);
                segments.Add(new ArraySegment<byte>(reply.Header, 0, reply.HeaderLength));
                if (reply.Payload is not null)
                {
                    segments.Add(new ArraySegment<byte>(reply.Payload, 0, reply.PayloadLength));
                }
            }
            try
            {
                if (!broken)
                {
                    // Unsent replies hold their budget: a client that stops reading gets SendTimeout.
                    await _transport.SendAsync(segments, _sendDeadline.Arm(_options.SendTimeout));
                    _sendDeadline.Disarm();
                }
            }
            catch (Exception e) when (e is IOException or System.Net.Sockets.SocketException or ObjectDisposedException or OperationCanceledException)
            {
                if (_sendDeadline.Expired)
                {
                    ReportTooSlow("replies were not read within the send timeout", $"replies not read within {_options.SendTimeout.TotalSeconds:0.#} s");
                }
                // The client is gone; keep draining so every admitted request releases its budget.
                broken = true;
                _aborted.Cancel();
                _transport.Abort();
            }
            foreach (PendingReply sent in batch)
            {
                Settle(sent);
            }
            batch.Clear();
            segments.Clear();
        }
    }

    private void Settle(PendingReply reply)
    {
        ArrayPool<byte>.Shared.Return(reply.Header);
        if (reply.Payload is not null)
        {
            ArrayPool<byte>.Shared.Return(reply.Payload);
        }
        if (reply.Charge > 0)
        {
            _connectionBudget.Release(reply.Charge);
            _serverBudget.Release(_serverBudget.Clamp(reply.Charge));
        }
        if (reply.HoldsSlot)
        {
            _requestSlots.Release();
        }
        EndRequest();
    }

    private void BeginRequest()
    {
        lock (_inFlightLock)
        {
            _inFlight++;
        }
    }

    private void EndRequest()
    {
        TaskCompletionSource? idle = null;
        lock (_inFlightLock)
        {
            if (--_inFlight == 0)
            {
                idle = _idle;
                _idle = null;
            }
        }
        idle?.TrySetResult();
    }

    private Task WhenIdleAsync()
    {
        lock (_inFlightLock)
        {
            if (_inFlight == 0)
            {
                return Task.CompletedTask;
            }
            _idle ??= new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
            return _idle.Task;
        }
    }

    /// <summary>A reply ready to send, and what to release once it is sent.</summary>
    private readonly record struct PendingReply(byte[] Header, int HeaderLength, byte[]? Payload, int PayloadLength, long Charge, bool HoldsSlot);
}
