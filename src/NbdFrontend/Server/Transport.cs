using System.IO.Pipelines;
using System.Net.Sockets;

namespace NbdServer.Frontend.Server;

/// <summary>
/// The byte stream of one client: a pipe for reading, and a gather send for writing so a reply's
/// header and payload leave in one write (separate small sends stall clients on Nagle/delayed-ACK).
/// </summary>
internal sealed class Transport : IAsyncDisposable
{
    private readonly Stream _stream;
    private readonly Socket? _socket;
    private int _closed;

    /// <param name="stream">The connection (a NetworkStream, or an in-process duplex stream in tests).</param>
    /// <param name="socket">When present, sends use the socket's scatter/gather API directly.</param>
    public Transport(Stream stream, Socket? socket, int readBufferSize)
    {
        _stream = stream;
        _socket = socket;
        // The reader never waits for a whole payload to be buffered (payloads are copied out as they
        // arrive), so a modest segment size works for 32 MiB writes too.
        Input = PipeReader.Create(stream, new StreamPipeReaderOptions(bufferSize: readBufferSize, minimumReadSize: readBufferSize / 4, leaveOpen: true));
    }

    public PipeReader Input { get; }

    public string RemoteEndPoint => _socket?.RemoteEndPoint?.ToString() ?? "in-process";

    /// <summary>Sends every segment, in order, as one gather write.</summary>
    public async ValueTask SendAsync(IList<ArraySegment<byte>> segments, CancellationToken cancellationToken)
    {
        if (_socket is not null)
        {
            long expected = 0;
            foreach (ArraySegment<byte> s in segments)
            {
                expected += s.Count;
            }
            int sent = await _socket.SendAsync(segments, SocketFlags.None).WaitAsync(cancellationToken);
            if (sent != expected)
            {
                throw new IOException($"short send: {sent} of {expected} bytes");
            }
            return;
        }
        foreach (ArraySegment<byte> segment in segments)
        {
            await _stream.WriteAsync(segment, cancellationToken);
        }
        await _stream.FlushAsync(cancellationToken);
    }

    public ValueTask SendAsync(ArraySegment<byte> segment, CancellationToken cancellationToken) => SendAsync([segment], cancellationToken);

    /// <summary>Closes the connection once, whoever asks first.</summary>
    public void Abort()
    {
        if (Interlocked.Exchange(ref _closed, 1) != 0)
        {
            return;
        }
        try
        {
            _socket?.Shutdown(SocketShutdown.Both);
        }
        catch (SocketException)
        {
            // Already reset by the peer: nothing left to shut down.
        }
        catch (ObjectDisposedException)
        {
        }
        _socket?.Dispose();
        _stream.Dispose();
    }

    public async ValueTask DisposeAsync()
    {
        await Input.CompleteAsync();
        Abort();
    }
}
