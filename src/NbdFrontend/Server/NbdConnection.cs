using System.Buffers;
using System.Diagnostics;
using System.IO.Pipelines;
using Microsoft.Extensions.Logging;
using NbdServer.Common.Logging;
using NbdServer.Common.Tls;
using NbdServer.Common.Volumes;
using NbdServer.Nbd;

namespace NbdServer.Frontend.Server;

/// <summary>
/// One client connection: handshake, then the transmission phase. Requests are read in order by one
/// loop and run concurrently; replies go out as they complete, batched by one writer at a time (one
/// gather send per batch; see NbdConnection.Replies.cs). Memory is bounded: a request is admitted
/// only when its payload fits the connection's and the server's byte budgets, so at the cap we
/// simply stop reading the socket.
/// </summary>
internal sealed partial class NbdConnection : IAsyncDisposable
{
    private const int MaxRepliesPerBatch = 128;

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
    private readonly TimeProvider _time;
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

    // Handover (see HandOverAsync): the request loop stops between two requests, never inside one.
    private const string HandoverStop = "handed over to the next server image";
    private readonly Lock _readGate = new();
    private readonly TaskCompletionSource<HandedConnection?> _handedOver = new(TaskCreationOptions.RunContinuationsAsynchronously);
    private bool _handingOver;
    private bool _awaitingRequest;

    /// <param name="resumed">
    /// A session negotiated by an earlier image of the server and handed over: the handshake is
    /// skipped and the connection starts in the transmission phase.
    /// </param>
    public NbdConnection(long id, Transport transport, ExportRegistry exports, FrontendOptions options, ByteBudget serverBudget, ILogger logger, LogThrottle? throttle = null, TlsServerPolicy? tls = null, TimeProvider? time = null, NegotiatedSession? resumed = null)
    {
        _session = resumed;
        _tls = tls;
        Id = id;
        _transport = transport;
        _exports = exports;
        _options = options;
        _serverBudget = serverBudget;
        _connectionBudget = new ByteBudget(options.MaxInFlightBytesPerConnection);
        _requestSlots = new SemaphoreSlim(options.MaxInFlightRequestsPerConnection);
        _time = time ?? TimeProvider.System;
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
        try
        {
            if (_session is null)
            {
                if (await NegotiateAsync(serverStopping) is { } refused)
                {
                    reason = refused;
                    return;
                }
            }
            else
            {
                FrontendLog.Resumed(_logger, Id, _transport.RemoteEndPoint, _session.Export.Name);
            }
            FrontendMetrics.ConnectionAttached();
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
            Task idle = WhenIdleAsync();
            await idle.WaitAsync(_options.ShutdownTimeout).ContinueWith(static _ => { }, TaskScheduler.Default);
            HandedConnection? handed = null;
            if (reason == HandoverStop && idle.IsCompletedSuccessfully && !_broken && !_aborted.IsCancellationRequested
                && _transport.Detach() is var (socket, pending))
            {
                // Every admitted request is answered and nothing after them was taken: the client
                // sees one stream of replies across the two images.
                handed = new HandedConnection(socket, pending, _session!);
            }
            else if (reason == HandoverStop)
            {
                reason = _transport.Tls is not null ? "TLS sessions cannot be handed over; the client must reconnect" : "not idle at the handover";
            }
            // Closed before the reload may go on to exec: a socket adopted from an earlier image is
            // not close-on-exec until then, and must not leak into the next image.
            _transport.Abort();
            _handedOver.TrySetResult(handed);
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

    /// <summary>The handshake; null once attached to an export, else why the connection ends.</summary>
    private async Task<string?> NegotiateAsync(CancellationToken serverStopping)
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
                string reason = serverStopping.IsCancellationRequested ? "server shutting down during handshake" : $"handshake not finished within {_options.HandshakeTimeout.TotalSeconds:0} s";
                if (!serverStopping.IsCancellationRequested)
                {
                    ReportDropped("handshake not finished within the handshake timeout", reason);
                }
                return reason;
            }
        }
        if (_session is null)
        {
            return "handshake ended without an export";
        }
        FrontendLog.Attached(_logger, Id, _transport.RemoteEndPoint, _session.Export.Name, _session.StructuredReplies, _session.BaseAllocation, _transport.Tls is not null);
        return null;
    }

    /// <summary>Stop taking work: new requests get ESHUTDOWN; completes once in-flight requests are answered.</summary>
    public Task BeginShutdownAsync()
    {
        _shuttingDown = true;
        WakeQosWaiter();
        return WhenIdleAsync();
    }

    /// <summary>
    /// Stops this connection between two requests so its socket can be handed to the next image of
    /// the server: no new request is taken, the admitted ones are answered, and the socket is
    /// returned open with whatever was read from it and not taken. A connection still in the
    /// handshake gets <see cref="FrontendOptions.HandoverHandshakeGrace"/> to finish it first.
    /// Null when the connection cannot be handed over (handshake not done in time, TLS, broken, or
    /// not idle within the shutdown timeout): then it is closed like at shutdown.
    /// </summary>
    public Task<HandedConnection?> HandOverAsync()
    {
        bool negotiating;
        lock (_readGate)
        {
            _handingOver = true;
            negotiating = _session is null;
            if (_awaitingRequest)
            {
                // Parked between two requests: wake it. Only here, so the cancellation can never
                // land on a read inside a request (its payload).
                _transport.Input.CancelPendingRead();
            }
        }
        if (negotiating)
        {
            _ = CloseIfStillNegotiatingAsync();
        }
        return _handedOver.Task;
    }

    private async Task CloseIfStillNegotiatingAsync()
    {
        Task handed = _handedOver.Task;
        if (await Task.WhenAny(handed, Task.Delay(_options.HandoverHandshakeGrace, _time)) != handed && _session is null)
        {
            // Not attached in time: nothing to keep; the client sees a closed connection and tries again.
            Abort();
        }
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
        _qosWaiter?.Dispose();
    }

    /// <summary>
    /// The request loop. Every request that is whole in what one receive brought, and whose budget is
    /// free, is taken straight from the pipe's buffer: all of them are started before any reply is
    /// sent, and whatever completed inline goes out in one send at the end of the batch. A request
    /// that must wait (for its budget or the rest of its payload) takes the one-at-a-time path.
    /// </summary>
    private async Task<string> ReadRequestsAsync()
    {
        CancellationToken cancellationToken = _aborted.Token;
        NegotiatedSession session = _session!;
        PipeReader input = _transport.Input;
        while (true)
        {
            lock (_readGate)
            {
                if (_handingOver)
                {
                    return HandoverStop;
                }
                _awaitingRequest = true;
            }
            ReadResult result;
            try
            {
                result = await input.ReadAsync(cancellationToken);
            }
            finally
            {
                lock (_readGate)
                {
                    _awaitingRequest = false;
                }
            }
            ReadOnlySequence<byte> buffer = result.Buffer;
            if (Volatile.Read(ref _handingOver))
            {
                // What was read stays in the pipe for the next image, requests cut short included.
                input.AdvanceTo(buffer.Start);
                return HandoverStop;
            }
            string? stop = null;
            _batchThread = Environment.CurrentManagedThreadId;
            try
            {
                while (stop is null && TryTakeBuffered(ref buffer, session, ref stop))
                {
                }
            }
            finally
            {
                // Also when the batch ends in an exception: what it queued is still owed a send.
                _batchThread = 0;
                ScheduleFlush();
            }
            if (stop is not null)
            {
                input.AdvanceTo(buffer.Start);
                return stop;
            }
            if (buffer.Length >= NbdRequest.Size)
            {
                if (Volatile.Read(ref _handingOver))
                {
                    // Not into the one-at-a-time path, which waits for a payload and its budget: the
                    // request goes over unread, with whatever part of it has arrived.
                    input.AdvanceTo(buffer.Start);
                    return HandoverStop;
                }
                input.AdvanceTo(buffer.Start);
                stop = await ReadOneRequestAsync(session, cancellationToken);
                if (stop is not null)
                {
                    return stop;
                }
                continue;
            }
            if (result.IsCompleted || result.IsCanceled)
            {
                input.AdvanceTo(buffer.Start, buffer.End);
                return buffer.IsEmpty ? "client closed the connection" : throw new EndOfStreamException("connection closed in the middle of a message");
            }
            input.AdvanceTo(buffer.Start, buffer.End);
        }
    }

    /// <summary>
    /// Takes the request at the front of <paramref name="buffer"/> if it is whole there and admitted
    /// without waiting; false leaves it in place (or sets <paramref name="stop"/> to end the connection).
    /// </summary>
    private bool TryTakeBuffered(ref ReadOnlySequence<byte> buffer, NegotiatedSession session, ref string? stop)
    {
        if (buffer.Length < NbdRequest.Size)
        {
            return false;
        }
        NbdRequest request;
        if (buffer.FirstSpan.Length >= NbdRequest.Size)
        {
            request = NbdRequest.Parse(buffer.FirstSpan);
        }
        else
        {
            Span<byte> header = stackalloc byte[NbdRequest.Size];
            buffer.Slice(0, NbdRequest.Size).CopyTo(header);
            request = NbdRequest.Parse(header);
        }
        if (request.Magic != NbdMagic.Request)
        {
            // Without a valid magic we cannot find the next request boundary: hard disconnect.
            ReportDropped("bad request magic", $"magic 0x{request.Magic:x8}");
            stop = "protocol violation";
            return false;
        }
        if (request.Command == NbdCommand.Disconnect)
        {
            buffer = buffer.Slice(NbdRequest.Size);
            stop = "client sent NBD_CMD_DISC";
            return false;
        }
        uint payloadLength = request.Command == NbdCommand.Write ? request.Length : 0;
        if (buffer.Length - NbdRequest.Size < payloadLength)
        {
            return false;
        }
        (NbdError error, string message) = _shuttingDown ? (NbdError.ESHUTDOWN, "server is shutting down") : Validate(request, session);
        long charge = error != NbdError.None ? _connectionBudget.Clamp(ErrorReplyCharge) : Charge(request);
        if (error == NbdError.None && !TryQosNow(request, session.Export))
        {
            return false;
        }
        if (!TryAdmit(charge))
        {
            if (error == NbdError.None)
            {
                RefundQos(request, session.Export);
            }
            return false;
        }
        buffer = buffer.Slice(NbdRequest.Size);
        BeginRequest();
        Job job = RentJob(request, charge);
        if (error != NbdError.None)
        {
            buffer = buffer.Slice(payloadLength);
            ReportFailure(request, error, message);
            FrontendMetrics.Record(request.Command, request.Length, ok: false, Stopwatch.GetTimestamp());
            SetErrorReply(job, error, message);
            Enqueue(job);
            return true;
        }
        if (payloadLength > 0)
        {
            job.Buffer = ArrayPool<byte>.Shared.Rent((int)payloadLength);
            buffer.Slice(0, payloadLength).CopyTo(job.Buffer);
            buffer = buffer.Slice(payloadLength);
        }
        Dispatch(job, session);
        return true;
    }

    /// <summary>One request read piece by piece, waiting for its budget and payload; null to go on.</summary>
    private async Task<string?> ReadOneRequestAsync(NegotiatedSession session, CancellationToken cancellationToken)
    {
        if (!await _transport.Input.ReadExactlyAsync(_requestHeader, cancellationToken))
        {
            return "client closed the connection";
        }
        NbdRequest request = NbdRequest.Parse(_requestHeader);
        if (request.Magic != NbdMagic.Request)
        {
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
            Job failed = RentJob(request, errorCharge);
            SetErrorReply(failed, error, message);
            Enqueue(failed);
            return null;
        }

        // A request that waits for QoS counts as in flight from here, so a shutdown's drain answers it.
        bool counted = session.Export.Qos.Active && await ThrottleCountedAsync(request, session.Export, cancellationToken);
        long charge = Charge(request);
        try
        {
            await AdmitAsync(charge, cancellationToken);
        }
        catch when (counted)
        {
            EndRequest();
            throw;
        }
        if (!counted)
        {
            BeginRequest();
        }
        Job job = RentJob(request, charge);
        if (payloadLength > 0)
        {
            job.Buffer = ArrayPool<byte>.Shared.Rent((int)payloadLength);
            bool complete = false;
            try
            {
                // The write holds its budget while its payload arrives: a deadline, so a client
                // that stops half-way cannot keep it (and starve the other connections) forever.
                complete = await _transport.Input.ReadExactlyAsync(job.Buffer.AsMemory(0, (int)payloadLength), _payloadDeadline.Arm(_options.PayloadTimeout));
                _payloadDeadline.Disarm();
            }
            finally
            {
                if (!complete)
                {
                    // A torn write is never applied; give back what it was admitted with.
                    Settle(job);
                }
            }
            if (!complete)
            {
                return "client closed the connection in the middle of a write";
            }
        }
        Dispatch(job, session);
        return null;
    }

    private long Charge(in NbdRequest request) => request.Command switch
    {
        NbdCommand.Read or NbdCommand.Write => _connectionBudget.Clamp(request.Length),
        NbdCommand.WriteZeroes => _connectionBudget.Clamp(Math.Min(request.Length, WriteZeroesCharge)),
        // Its reply is built in memory: charged for the most descriptors it may carry.
        NbdCommand.BlockStatus => _connectionBudget.Clamp(NbdReplyWriter.BlockStatusChunkSize(_options.MaxBlockStatusExtents)),
        _ => 0,
    };

    /// <summary>Takes a slot and the budgets only if all are free now (the batch path never waits).</summary>
    private bool TryAdmit(long charge)
    {
        if (!_requestSlots.Wait(0))
        {
            return false;
        }
        if (!_connectionBudget.TryAcquire(charge))
        {
            _requestSlots.Release();
            return false;
        }
        if (!_serverBudget.TryAcquire(_serverBudget.Clamp(charge)))
        {
            _connectionBudget.Release(charge);
            _requestSlots.Release();
            return false;
        }
        return true;
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
}
