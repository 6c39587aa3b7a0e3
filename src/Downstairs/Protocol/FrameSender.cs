using System.Net.Sockets;
using System.Runtime.InteropServices;
using System.Threading.Channels;

namespace NbdServer.Downstairs.Protocol;

/// <summary>
/// The single writer of a connection. Frames queued by any thread are sent in order; everything
/// queued at the moment the writer wakes goes out in one gather send (header, payload, next header…),
/// so at queue depth 32 a burst of replies costs one syscall, and no small write waits on Nagle.
/// </summary>
/// <remarks>
/// The queue itself is unbounded on purpose: every frame in it already holds a slot of the
/// connection's in-flight budget, which is what bounds it (and a reply can never be refused).
/// </remarks>
internal sealed class FrameSender
{
    /// <summary>At most this many frames or bytes per gather send (keeps the segment list small).</summary>
    private const int MaxFramesPerSend = 64;
    private const int MaxBytesPerSend = 4 << 20;

    private readonly Stream _stream;
    private readonly Socket? _socket;
    private readonly Channel<OutgoingFrame> _queue = Channel.CreateUnbounded<OutgoingFrame>(new UnboundedChannelOptions { SingleReader = true });
    private readonly Task _loop;

    public FrameSender(Stream stream)
    {
        _stream = stream;
        _socket = (stream as NetworkStream)?.Socket;
        _loop = Task.Run(RunAsync);
    }

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
                await SendAsync(batch, segments, bytes).ConfigureAwait(false);
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
            // In-process transports (tests): plain sequential writes.
            foreach (OutgoingFrame frame in batch)
            {
                await _stream.WriteAsync(frame.Prefix.AsMemory(0, frame.PrefixLength)).ConfigureAwait(false);
                if (!frame.Payload1.IsEmpty)
                {
                    await _stream.WriteAsync(frame.Payload1).ConfigureAwait(false);
                }
                if (!frame.Payload2.IsEmpty)
                {
                    await _stream.WriteAsync(frame.Payload2).ConfigureAwait(false);
                }
            }
            await _stream.FlushAsync().ConfigureAwait(false);
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
