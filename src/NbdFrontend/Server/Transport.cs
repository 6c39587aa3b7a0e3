using System.Buffers;
using System.IO.Pipelines;
using System.Net.Security;
using System.Net.Sockets;
using NbdServer.Common.Tls;

namespace NbdServer.Frontend.Server;

/// <summary>
/// The byte stream of one client: a pipe for reading, and a gather send for writing so a reply's
/// header and payload leave in one write (separate small sends stall clients on Nagle/delayed-ACK).
/// After STARTTLS both run over an <see cref="SslStream"/> whose records are held until the flush at
/// the end of each batch, so a batch still leaves in one send.
/// </summary>
internal sealed class Transport : IAsyncDisposable
{
    private readonly Socket? _socket;
    private readonly int _readBufferSize;
    private Stream _stream;
    private bool _gatherOnSocket;
    private int _closed;

    /// <param name="stream">The connection (a NetworkStream, or an in-process duplex stream in tests).</param>
    /// <param name="socket">When present, sends use the socket's scatter/gather API directly.</param>
    /// <param name="pending">
    /// Bytes read from this connection by an earlier image of the server and not taken by a request
    /// yet (see <see cref="HandoverState"/>): they come first, then the socket.
    /// </param>
    public Transport(Stream stream, Socket? socket, int readBufferSize, byte[]? pending = null)
    {
        if (pending is { Length: > 0 })
        {
            stream = new PrefixedStream(pending, stream);
        }
        _stream = stream;
        _socket = socket;
        _gatherOnSocket = socket is not null;
        _readBufferSize = readBufferSize;
        Input = CreateReader(stream, readBufferSize);
    }

    public PipeReader Input { get; private set; }

    /// <summary>The TLS session once STARTTLS succeeded; null in plaintext.</summary>
    public SslStream? Tls { get; private set; }

    public string RemoteEndPoint => _socket switch
    {
        null => "in-process",
        { AddressFamily: AddressFamily.Unix } => "unix socket",
        _ => _socket.RemoteEndPoint?.ToString() ?? "?",
    };

    /// <summary>
    /// True when the client sent bytes we have not read yet. Checked after STARTTLS's ACK: the client
    /// must wait for it before the TLS handshake, so anything already here was sent in plaintext
    /// ahead of time and must not be mistaken for (or mixed into) the TLS stream.
    /// </summary>
    public bool HasUnreadInput()
    {
        if (!Input.TryRead(out ReadResult result))
        {
            return false;
        }
        bool any = !result.Buffer.IsEmpty;
        Input.AdvanceTo(result.Buffer.Start);
        return any;
    }

    /// <summary>
    /// Runs the server side of the TLS handshake on the connection and switches reading and writing
    /// to the TLS session. The plaintext pipe must be empty (see <see cref="HasUnreadInput"/>).
    /// </summary>
    public async Task UpgradeToTlsAsync(TlsServerPolicy policy, TimeSpan timeout, CancellationToken cancellationToken)
    {
        await Input.CompleteAsync();
        SslStream tls = await policy.AuthenticateAsync(_stream, timeout, cancellationToken);
        Tls = tls;
        _stream = tls;
        _gatherOnSocket = false;
        Input = CreateReader(tls, _readBufferSize);
    }

    /// <summary>Sends every segment, in order, as one gather write.</summary>
    public async ValueTask SendAsync(IList<ArraySegment<byte>> segments, CancellationToken cancellationToken)
    {
        if (_gatherOnSocket)
        {
            long expected = 0;
            foreach (ArraySegment<byte> s in segments)
            {
                expected += s.Count;
            }
            int sent = await _socket!.SendAsync(segments, SocketFlags.None).WaitAsync(cancellationToken);
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

    /// <summary>
    /// Takes the socket out of this transport, open, with the bytes read from it that nobody took
    /// (the reader must be stopped at a request boundary); the transport is closed without closing
    /// the socket. Null when there is no socket to give (in-process stream) or it runs TLS, whose
    /// session state cannot leave the process.
    /// </summary>
    public (Socket Socket, byte[] Pending)? Detach()
    {
        if (_socket is null || Tls is not null || Interlocked.Exchange(ref _closed, 1) != 0)
        {
            return null;
        }
        byte[] pending = [];
        // TryRead returns nothing for bytes already examined (a batch that ended on half a header
        // marks them so) unless a read is cancelled: cancel, and every buffered byte comes back.
        Input.CancelPendingRead();
        if (Input.TryRead(out ReadResult result))
        {
            pending = result.Buffer.ToArray();
            Input.AdvanceTo(result.Buffer.End);
        }
        // The stream owns the socket: completing the reader leaves it open (leaveOpen), and the
        // stream itself is dropped, not disposed.
        Input.Complete();
        return (_socket, pending);
    }

    // The reader never waits for a whole payload to be buffered (payloads are copied out as they
    // arrive), so a modest segment size works for 32 MiB writes too.
    private static PipeReader CreateReader(Stream stream, int readBufferSize) =>
        PipeReader.Create(stream, new StreamPipeReaderOptions(bufferSize: readBufferSize, minimumReadSize: readBufferSize / 4, leaveOpen: true));
}
