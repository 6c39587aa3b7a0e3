using System.Buffers;
using System.Net.Sockets;
using System.Runtime.InteropServices;
using System.Threading.Channels;

namespace NbdServer.Protocol;

/// <summary>
/// The single writer of a connection. Frames queued by any thread are sent in order; everything
/// queued at the moment the writer wakes goes out in one gather send (header, payload, next header…),
/// so at queue depth 32 a burst of replies costs one syscall, and no small write waits on Nagle.
/// </summary>
/// <remarks>
/// The queue itself is unbounded on purpose: on the downstairs every frame in it already holds a slot
/// of the connection's in-flight budget, which is what bounds it (and a reply can never be refused);
/// on the client, the engine's admission (at most the Hello's MaxJobs per replica) bounds it.
/// </remarks>
public sealed class FrameSender
{
    /// <summary>At most this many frames or bytes per gather send (keeps the segment list small).</summary>
    private const int MaxFramesPerSend = 64;
    private const int MaxBytesPerSend = 4 << 20;

    /// <summary>
    /// Without a socket (a TLS stream) frames are copied into one buffer of this size per write.
    /// Each SslStream write ends at least one TLS record (and one send of it), so writing a header,
    /// then a 4 KiB payload, then the next header made three records per frame; one write per batch
    /// lets records fill to their 16 KiB maximum. Payloads at least this big go out directly: they
    /// fill their records anyway and a copy would only cost memory bandwidth.
    /// </summary>
    public const int CoalesceBytes = 256 << 10;

    private readonly Stream _stream;
    private readonly Socket? _socket;
    private readonly Channel<OutgoingFrame> _queue = Channel.CreateUnbounded<OutgoingFrame>(new UnboundedChannelOptions { SingleReader = true });
    private readonly Task _loop;
    private long _sendingSince;

    public FrameSender(Stream stream)
    {
        _stream = stream;
        _socket = (stream as NetworkStream)?.Socket;
        _loop = Task.Run(RunAsync);
    }

    /// <summary>
    /// When the send under way began (a <see cref="System.Diagnostics.Stopwatch"/> timestamp), or 0 when
    /// none is: a peer that stops reading leaves it set, which the owner's deadline sweep can see.
    /// </summary>
    public long SendingSince => Volatile.Read(ref _sendingSince);

    /// <summary>Completes when the writer stops; faults with the send error if the link broke.</summary>
    public Task Completion => _loop;

    /// <summary>Queues a frame. False once the writer has stopped; the frame's callback then ran with sent = false.</summary>
    public bool Enqueue(OutgoingFrame frame)
    {
        if (_queue.Writer.TryWrite(frame))
        {
            return true;
        }
        Finish(frame, sent: false);
        return false;
    }

    /// <summary>
    /// Queues a frame; false once the writer has stopped, and then the frame stays the caller's (its
    /// callback has not run and will not). For a caller that must not run completion code on its own thread.
    /// </summary>
    public bool TryEnqueue(OutgoingFrame frame) => _queue.Writer.TryWrite(frame);

    /// <summary>Stops after the frames already queued are sent.</summary>
    public void Complete() => _queue.Writer.TryComplete();

    private async Task RunAsync()
    {
        var batch = new List<OutgoingFrame>(MaxFramesPerSend);
        var segments = new List<ArraySegment<byte>>(MaxFramesPerSend * 3);
        try
        {
            while (await _queue.Reader.WaitToReadAsync().ConfigureAwait(false))
            {
                long bytes = 0;
                while (batch.Count < MaxFramesPerSend && bytes < MaxBytesPerSend && _queue.Reader.TryRead(out OutgoingFrame? frame))
                {
                    batch.Add(frame);
                    bytes += frame.TotalLength;
                }
                Volatile.Write(ref _sendingSince, System.Diagnostics.Stopwatch.GetTimestamp());
                await SendAsync(batch, segments, bytes).ConfigureAwait(false);
                Volatile.Write(ref _sendingSince, 0);
                foreach (OutgoingFrame frame in batch)
                {
                    Finish(frame, sent: true);
                }
                batch.Clear();
            }
        }
        finally
        {
            _queue.Writer.TryComplete();
            foreach (OutgoingFrame frame in batch)
            {
                Finish(frame, sent: false);
            }
            while (_queue.Reader.TryRead(out OutgoingFrame? frame))
            {
                Finish(frame, sent: false);
            }
        }
    }

    private async Task SendAsync(List<OutgoingFrame> batch, List<ArraySegment<byte>> segments, long bytes)
    {
        if (_socket is null)
        {
            await WriteCoalescedAsync(batch).ConfigureAwait(false);
            return;
        }
        segments.Clear();
        foreach (OutgoingFrame frame in batch)
        {
            segments.Add(new ArraySegment<byte>(frame.Prefix, 0, frame.PrefixLength));
            AddSegment(segments, frame.Payload1);
            AddSegment(segments, frame.Payload2);
        }
        int sent = await _socket.SendAsync(segments, SocketFlags.None).ConfigureAwait(false);
        if (sent != bytes)
        {
            throw new IOException($"short gather send: {sent} of {bytes} bytes");
        }
    }

    private async Task WriteCoalescedAsync(List<OutgoingFrame> batch)
    {
        byte[] buffer = ArrayPool<byte>.Shared.Rent(CoalesceBytes);
        int filled = 0;
        try
        {
            foreach (OutgoingFrame frame in batch)
            {
                filled = await AppendAsync(buffer, filled, frame.Prefix.AsMemory(0, frame.PrefixLength)).ConfigureAwait(false);
                filled = await AppendAsync(buffer, filled, frame.Payload1).ConfigureAwait(false);
                filled = await AppendAsync(buffer, filled, frame.Payload2).ConfigureAwait(false);
            }
            if (filled > 0)
            {
                await _stream.WriteAsync(buffer.AsMemory(0, filled)).ConfigureAwait(false);
            }
            await _stream.FlushAsync().ConfigureAwait(false);
        }
        finally
        {
            ArrayPool<byte>.Shared.Return(buffer);
        }
    }

    /// <summary>Copies <paramref name="piece"/> into the buffer, writing the buffer out each time it fills; returns the new fill.</summary>
    private async ValueTask<int> AppendAsync(byte[] buffer, int filled, ReadOnlyMemory<byte> piece)
    {
        if (piece.Length >= CoalesceBytes)
        {
            if (filled > 0)
            {
                await _stream.WriteAsync(buffer.AsMemory(0, filled)).ConfigureAwait(false);
            }
            await _stream.WriteAsync(piece).ConfigureAwait(false);
            return 0;
        }
        while (!piece.IsEmpty)
        {
            int take = Math.Min(piece.Length, buffer.Length - filled);
            piece.Span[..take].CopyTo(buffer.AsSpan(filled));
            filled += take;
            piece = piece[take..];
            if (filled == buffer.Length)
            {
                await _stream.WriteAsync(buffer.AsMemory(0, filled)).ConfigureAwait(false);
                filled = 0;
            }
        }
        return filled;
    }

    private static void AddSegment(List<ArraySegment<byte>> segments, ReadOnlyMemory<byte> payload)
    {
        if (payload.IsEmpty)
        {
            return;
        }
        if (!MemoryMarshal.TryGetArray(payload, out ArraySegment<byte> segment))
        {
            // Native or pinned-handle memory has no array: one copy is the price of gather.
            segment = new ArraySegment<byte>(payload.ToArray());
        }
        segments.Add(segment);
    }

    private static void Finish(OutgoingFrame frame, bool sent)
    {
        frame.ReturnPrefix();
        frame.Completed?.Invoke(frame, sent);
    }
}
