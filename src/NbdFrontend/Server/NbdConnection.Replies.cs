using System.Buffers;
using System.Collections.Concurrent;
using System.Diagnostics;
using NbdServer.Common.Volumes;
using NbdServer.Nbd;

namespace NbdServer.Frontend.Server;

/// <summary>Running admitted requests and sending their replies.</summary>
internal sealed partial class NbdConnection
{
    // Jobs are pooled per connection (at most one per request slot is ever alive), so a READ or
    // WRITE costs no allocation of ours: no state machine, no reply object, no header array.
    private readonly ConcurrentQueue<Job> _jobPool = new();

    // Replies ready to send. Every queued reply holds a request slot until it is sent, so the queue
    // never holds more than there are slots: a client that pipelines and never reads stops being read.
    private readonly ConcurrentQueue<Job> _replies = new();
    private readonly List<Job> _batch = new(MaxRepliesPerBatch);
    private readonly List<ArraySegment<byte>> _segments = new(MaxRepliesPerBatch * 2);

    // 1 while one thread sends; whoever queues a reply and finds it 0 becomes the writer. A volume
    // completing on a pool thread thus sends its own reply (and any queued beside it) without a hop
    // to a writer task; replies that pile up during a send leave together in the next one.
    private int _flushing;
    private bool _broken;

    // The thread running the request loop's batch (0 outside one): its replies are sent once at the
    // end of the batch instead of one by one.
    private volatile int _batchThread;

    private Job RentJob(in NbdRequest request, long charge)
    {
        if (!_jobPool.TryDequeue(out Job? job))
        {
            job = new Job(this);
        }
        job.Request = request;
        job.Charge = charge;
        return job;
    }

    /// <summary>Starts the volume operation; its reply is queued when it completes (inline if it already has).</summary>
    private void Dispatch(Job job, NegotiatedSession session)
    {
        IBlockVolume volume = session.Export.Volume;
        NbdRequest request = job.Request;
        CancellationToken cancellationToken = _aborted.Token;
        job.Started = Stopwatch.GetTimestamp();
        job.Structured = session.StructuredReplies;
        ValueTask operation;
        try
        {
            switch (request.Command)
            {
                case NbdCommand.Read:
                    job.Buffer = ArrayPool<byte>.Shared.Rent(Math.Max(1, (int)request.Length));
                    operation = volume.ReadAsync((long)request.Offset, job.Buffer.AsMemory(0, (int)request.Length), cancellationToken);
                    break;
                case NbdCommand.Write:
                    var writeOptions = (request.Flags & CommandFlags.Fua) != 0 ? WriteOptions.ForceUnitAccess : WriteOptions.None;
                    operation = volume.WriteAsync((long)request.Offset, job.Buffer.AsMemory(0, (int)request.Length), writeOptions, cancellationToken);
                    break;
                default:
                    operation = ExecuteOtherAsync(job, volume, cancellationToken);
                    break;
            }
        }
        catch (Exception e)
        {
            operation = ValueTask.FromException(e);
        }
        job.Operation = operation;
        if (operation.IsCompleted)
        {
            Complete(job);
        }
        else
        {
            operation.GetAwaiter().UnsafeOnCompleted(job.OnOperationCompleted);
        }
    }

    /// <summary>The rarer commands, as a plain async method (they may allocate).</summary>
    private async ValueTask ExecuteOtherAsync(Job job, IBlockVolume volume, CancellationToken cancellationToken)
    {
        NbdRequest request = job.Request;
        var writeOptions = (request.Flags & CommandFlags.Fua) != 0 ? WriteOptions.ForceUnitAccess : WriteOptions.None;
        long offset = (long)request.Offset;
        switch (request.Command)
        {
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
                job.MaxExtents = (request.Flags & CommandFlags.RequestOne) != 0 ? 1 : _options.MaxBlockStatusExtents;
                job.Extents = await volume.GetAllocationAsync(offset, request.Length, job.MaxExtents, cancellationToken);
                break;
        }
    }

    /// <summary>The operation finished: builds the reply (or the error reply) and queues it.</summary>
    private void Complete(Job job)
    {
        NbdRequest request = job.Request;
        bool ok = false;
        try
        {
            job.Operation.GetAwaiter().GetResult();
            ok = true;
            switch (request.Command)
            {
                case NbdCommand.Read:
                    SetReadReply(job);
                    break;
                case NbdCommand.BlockStatus:
                    SetBlockStatusReply(job);
                    break;
                default:
                    job.HeaderLength = NbdReplyWriter.WriteSimple(job.Header, request.Cookie, NbdError.None);
                    break;
            }
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
            SetErrorReply(job, error, e.Message);
        }
        catch (OperationCanceledException)
        {
            SetErrorReply(job, NbdError.ESHUTDOWN, "connection is closing");
        }
        catch (Exception e)
        {
            FrontendLog.Unexpected(_logger, Id, e);
            SetErrorReply(job, NbdError.EIO, "internal error");
        }
        finally
        {
            job.Operation = default;
            job.Extents = null;
            if (request.Command == NbdCommand.Write)
            {
                ReturnBuffer(job);
            }
            FrontendMetrics.Record(request.Command, request.Length, ok, job.Started);
        }
        Enqueue(job);
    }

    private static void SetReadReply(Job job)
    {
        NbdRequest request = job.Request;
        if (!job.Structured)
        {
            job.HeaderLength = NbdReplyWriter.WriteSimple(job.Header, request.Cookie, NbdError.None);
            job.PayloadLength = (int)request.Length;
            return;
        }
        if (request.Length == 0)
        {
            // An OFFSET_DATA chunk must carry at least one byte; an empty read is just "done".
            ReturnBuffer(job);
            job.HeaderLength = NbdReplyWriter.WriteDone(job.Header, request.Cookie);
            return;
        }
        // One OFFSET_DATA chunk for the whole read, so DF is always honoured. The data goes out from
        // the buffer the volume read into, right behind this header, without a copy.
        job.HeaderLength = NbdReplyWriter.WriteOffsetDataHeader(job.Header, ReplyFlags.Done, request.Cookie, request.Offset, request.Length);
        job.PayloadLength = (int)request.Length;
    }

    private static void SetBlockStatusReply(Job job)
    {
        NbdRequest request = job.Request;
        IReadOnlyList<AllocationExtent> extents = job.Extents!;
        int count = Math.Min(Math.Max(extents.Count, 1), job.MaxExtents);
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
            int size = NbdReplyWriter.BlockStatusChunkSize(written);
            if (size > job.Header.Length)
            {
                job.RentedHeader = ArrayPool<byte>.Shared.Rent(size);
            }
            job.HeaderLength = NbdReplyWriter.WriteBlockStatus(job.ReplyHeader, request.Cookie, MetaContexts.BaseAllocationId, descriptors.AsSpan(0, written));
        }
        finally
        {
            ArrayPool<BlockStatusDescriptor>.Shared.Return(descriptors);
        }
    }

    private void SetErrorReply(Job job, NbdError error, string message)
    {
        ReturnBuffer(job);
        job.PayloadLength = 0;
        job.HeaderLength = _session is { StructuredReplies: true }
            ? NbdReplyWriter.WriteError(job.Header, job.Request.Cookie, error, message)
            : NbdReplyWriter.WriteSimple(job.Header, job.Request.Cookie, error);
    }

    private static void ReturnBuffer(Job job)
    {
        if (job.Buffer is not null)
        {
            ArrayPool<byte>.Shared.Return(job.Buffer);
            job.Buffer = null;
        }
    }

    private void Enqueue(Job job)
    {
        _replies.Enqueue(job);
        if (_batchThread != Environment.CurrentManagedThreadId)
        {
            ScheduleFlush();
        }
    }

    /// <summary>Sends what is queued unless another thread is already sending (it will send it too).</summary>
    private void ScheduleFlush()
    {
        if (!_replies.IsEmpty && Interlocked.CompareExchange(ref _flushing, 1, 0) == 0)
        {
            _ = FlushAsync();
        }
    }

    /// <summary>The one writer of the moment: drains the queue and sends each batch in one gather write.</summary>
    private async Task FlushAsync()
    {
        while (true)
        {
            while (_batch.Count < MaxRepliesPerBatch && _replies.TryDequeue(out Job? reply))
            {
                _batch.Add(reply);
                _segments.Add(new ArraySegment<byte>(reply.ReplyHeader, 0, reply.HeaderLength));
                if (reply.PayloadLength > 0)
                {
                    _segments.Add(new ArraySegment<byte>(reply.Buffer!, 0, reply.PayloadLength));
                }
            }
            if (_batch.Count == 0)
            {
                Volatile.Write(ref _flushing, 0);
                // A reply queued after the drain and before the release found the flag taken: take
                // it back and send that one too, or it would wait for the next reply.
                if (_replies.IsEmpty || Interlocked.CompareExchange(ref _flushing, 1, 0) != 0)
                {
                    return;
                }
                continue;
            }
            try
            {
                if (!_broken)
                {
                    // Unsent replies hold their budget: a client that stops reading gets SendTimeout.
                    await _transport.SendAsync(_segments, _sendDeadline.Arm(_options.SendTimeout));
                    _sendDeadline.Disarm();
                }
            }
            catch (Exception e)
            {
                if (_sendDeadline.Expired)
                {
                    ReportTooSlow("replies were not read within the send timeout", $"replies not read within {_options.SendTimeout.TotalSeconds:0.#} s");
                }
                else if (e is not (IOException or System.Net.Sockets.SocketException or ObjectDisposedException or OperationCanceledException))
                {
                    FrontendLog.Unexpected(_logger, Id, e);
                }
                // The client is gone; keep draining so every admitted request releases its budget.
                _broken = true;
                _aborted.Cancel();
                _transport.Abort();
            }
            foreach (Job sent in _batch)
            {
                Settle(sent);
            }
            _batch.Clear();
            _segments.Clear();
        }
    }

    /// <summary>A request is done (its reply sent, or never to be): gives back what it held.</summary>
    private void Settle(Job job)
    {
        ReturnBuffer(job);
        if (job.RentedHeader is not null)
        {
            ArrayPool<byte>.Shared.Return(job.RentedHeader);
            job.RentedHeader = null;
        }
        if (job.Charge > 0)
        {
            _connectionBudget.Release(job.Charge);
            _serverBudget.Release(_serverBudget.Clamp(job.Charge));
        }
        job.HeaderLength = 0;
        job.PayloadLength = 0;
        _jobPool.Enqueue(job);
        _requestSlots.Release();
        EndRequest();
    }

    /// <summary>One admitted request, from parse to its sent reply.</summary>
    private sealed class Job
    {
        /// <summary>Holds any reply but a long BLOCK_STATUS: the largest is an error chunk.</summary>
        public readonly byte[] Header = new byte[NbdReplyWriter.MaxErrorChunkSize];
        public readonly Action OnOperationCompleted;
        public NbdRequest Request;
        public long Charge;
        public long Started;
        public bool Structured;

        /// <summary>A WRITE's payload, or a READ's data (sent as the reply's payload); rented.</summary>
        public byte[]? Buffer;
        public byte[]? RentedHeader;
        public int HeaderLength;
        public int PayloadLength;
        public ValueTask Operation;
        public IReadOnlyList<AllocationExtent>? Extents;
        public int MaxExtents;

        public Job(NbdConnection owner)
        {
            // One delegate per job, made once: a pending volume operation calls back without allocating.
            OnOperationCompleted = () => owner.Complete(this);
        }

        public byte[] ReplyHeader => RentedHeader ?? Header;
    }
}
