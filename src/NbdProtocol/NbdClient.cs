using System.Buffers.Binary;
using System.Collections.Concurrent;
using System.Net.Sockets;
using System.Text;

namespace NbdServer.Nbd;

/// <summary>The transport or the server broke the connection; every outstanding request fails with this.</summary>
public sealed class NbdConnectionLostException(string message, Exception? inner = null) : Exception(message, inner);

/// <summary>
/// A small NBD client for tools (nbd-verify): fixed newstyle handshake, NBD_OPT_GO (falling back to
/// NBD_OPT_EXPORT_NAME), simple replies only, any number of requests pipelined on one socket.
/// Requests are sent whole (header and payload in one send, TCP_NODELAY); one reader task
/// matches replies to requests by cookie.
/// </summary>
public sealed class NbdClient : IAsyncDisposable
{
    private sealed class Pending(Memory<byte> readInto)
    {
        public readonly Memory<byte> ReadInto = readInto;
        public readonly TaskCompletionSource<NbdError> Done = new(TaskCreationOptions.RunContinuationsAsynchronously);
    }

    private readonly Socket _socket;
    private NetworkStream _stream = null!;
    private readonly SemaphoreSlim _sendLock = new(1, 1);
    private readonly ConcurrentDictionary<ulong, Pending> _pending = new();
    private readonly CancellationTokenSource _closing = new();
    private Task? _reader;
    private long _nextCookie;
    private volatile Exception? _broken;

    public ulong Size { get; private set; }
    public TransmissionFlags Flags { get; private set; }

    private NbdClient(Socket socket)
    {
        _socket = socket;
    }

    /// <summary>Connects to <c>nbd://host:port[/export]</c> and negotiates; throws IOException on any refusal.</summary>
    public static async Task<NbdClient> ConnectAsync(Uri uri, CancellationToken cancel)
    {
        if (uri.Scheme != "nbd")
        {
            throw new ArgumentException($"only nbd:// URIs are supported, not '{uri}'");
        }
        int port = uri.IsDefaultPort || uri.Port <= 0 ? 10809 : uri.Port;
        string export = Uri.UnescapeDataString(uri.AbsolutePath.TrimStart('/'));
        var socket = new Socket(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp) { NoDelay = true };
        var client = new NbdClient(socket);
        try
        {
            await socket.ConnectAsync(uri.Host, port, cancel);
            client._stream = new NetworkStream(socket, ownsSocket: true);
            await client.HandshakeAsync(export, cancel);
        }
        catch
        {
            await client.DisposeAsync();
            throw;
        }
        client._reader = Task.Run(client.ReadRepliesAsync, CancellationToken.None);
        return client;
    }

    private async Task HandshakeAsync(string export, CancellationToken cancel)
    {
        byte[] hello = new byte[18];
        await _stream.ReadExactlyAsync(hello, cancel);
        if (BinaryPrimitives.ReadUInt64BigEndian(hello) != NbdMagic.InitPassword
            || BinaryPrimitives.ReadUInt64BigEndian(hello.AsSpan(8)) != NbdMagic.Option)
        {
            throw new IOException("not a newstyle NBD server (bad greeting magic)");
        }
        var serverFlags = (HandshakeFlags)BinaryPrimitives.ReadUInt16BigEndian(hello.AsSpan(16));
        if ((serverFlags & HandshakeFlags.FixedNewstyle) == 0)
        {
            throw new IOException("server is not fixed-newstyle");
        }
        bool noZeroes = (serverFlags & HandshakeFlags.NoZeroes) != 0;
        ClientFlags clientFlags = ClientFlags.FixedNewstyle | (noZeroes ? ClientFlags.NoZeroes : 0);
        byte[] cf = new byte[4];
        BinaryPrimitives.WriteUInt32BigEndian(cf, (uint)clientFlags);
        await _stream.WriteAsync(cf, cancel);

        // NBD_OPT_GO: u32 name length, name, u16 number of info requests (none).
        byte[] name = Encoding.UTF8.GetBytes(export);
        byte[] go = new byte[4 + name.Length + 2];
        BinaryPrimitives.WriteUInt32BigEndian(go, (uint)name.Length);
        name.CopyTo(go, 4);
        await SendOptionAsync(NbdOption.Go, go, cancel);
        while (true)
        {
            (OptionReplyType type, byte[] data) = await ReadOptionReplyAsync(NbdOption.Go, cancel);
            switch (type)
            {
                case OptionReplyType.Info:
                    if (data.Length >= 12 && (InfoType)BinaryPrimitives.ReadUInt16BigEndian(data) == InfoType.Export)
                    {
                        Size = BinaryPrimitives.ReadUInt64BigEndian(data.AsSpan(2));
                        Flags = (TransmissionFlags)BinaryPrimitives.ReadUInt16BigEndian(data.AsSpan(10));
                    }
                    continue;
                case OptionReplyType.Ack:
                    return;
                case OptionReplyType.ErrUnsupported:
                    await ExportNameAsync(name, noZeroes, cancel);
                    return;
                default:
                    string why = data.Length > 0 ? Encoding.UTF8.GetString(data) : "";
                    throw new IOException($"server refused export '{export}': {type} {why}".TrimEnd());
            }
        }
    }

    private async Task ExportNameAsync(byte[] name, bool noZeroes, CancellationToken cancel)
    {
        await SendOptionAsync(NbdOption.ExportName, name, cancel);
        byte[] reply = new byte[10 + (noZeroes ? 0 : 124)];
        await _stream.ReadExactlyAsync(reply, cancel);
        Size = BinaryPrimitives.ReadUInt64BigEndian(reply);
        Flags = (TransmissionFlags)BinaryPrimitives.ReadUInt16BigEndian(reply.AsSpan(8));
    }

    private async Task SendOptionAsync(NbdOption option, byte[] data, CancellationToken cancel)
    {
        byte[] frame = new byte[16 + data.Length];
        BinaryPrimitives.WriteUInt64BigEndian(frame, NbdMagic.Option);
        BinaryPrimitives.WriteUInt32BigEndian(frame.AsSpan(8), (uint)option);
        BinaryPrimitives.WriteUInt32BigEndian(frame.AsSpan(12), (uint)data.Length);
        data.CopyTo(frame, 16);
        await _stream.WriteAsync(frame, cancel);
    }

    private async Task<(OptionReplyType, byte[])> ReadOptionReplyAsync(NbdOption option, CancellationToken cancel)
    {
        byte[] header = new byte[20];
        await _stream.ReadExactlyAsync(header, cancel);
        if (BinaryPrimitives.ReadUInt64BigEndian(header) != NbdMagic.OptionReply
            || BinaryPrimitives.ReadUInt32BigEndian(header.AsSpan(8)) != (uint)option)
        {
            throw new IOException("bad option reply");
        }
        var type = (OptionReplyType)BinaryPrimitives.ReadUInt32BigEndian(header.AsSpan(12));
        uint length = BinaryPrimitives.ReadUInt32BigEndian(header.AsSpan(16));
        if (length > 1 << 20)
        {
            throw new IOException($"option reply of {length} bytes");
        }
        byte[] data = new byte[length];
        await _stream.ReadExactlyAsync(data, cancel);
        return (type, data);
    }

    public Task<NbdError> ReadAsync(ulong offset, Memory<byte> into) =>
        SendAsync(NbdCommand.Read, CommandFlags.None, offset, (uint)into.Length, ReadOnlyMemory<byte>.Empty, into);

    public Task<NbdError> WriteAsync(ulong offset, ReadOnlyMemory<byte> data, bool fua = false) =>
        SendAsync(NbdCommand.Write, fua ? CommandFlags.Fua : CommandFlags.None, offset, (uint)data.Length, data, Memory<byte>.Empty);

    public Task<NbdError> FlushAsync() =>
        SendAsync(NbdCommand.Flush, CommandFlags.None, 0, 0, ReadOnlyMemory<byte>.Empty, Memory<byte>.Empty);

    private async Task<NbdError> SendAsync(NbdCommand command, CommandFlags flags, ulong offset, uint length, ReadOnlyMemory<byte> payload, Memory<byte> readInto)
    {
        if (_broken is { } broken)
        {
            throw new NbdConnectionLostException(broken.Message, broken);
        }
        ulong cookie = (ulong)Interlocked.Increment(ref _nextCookie);
        var pending = new Pending(readInto);
        _pending[cookie] = pending;
        // Header and payload leave in one send (Nagle, DESIGN §9).
        byte[] frame = new byte[NbdRequest.Size + payload.Length];
        new NbdRequest(NbdMagic.Request, flags, command, cookie, offset, length).Write(frame);
        payload.Span.CopyTo(frame.AsSpan(NbdRequest.Size));
        await _sendLock.WaitAsync();
        try
        {
            await _stream.WriteAsync(frame, _closing.Token);
        }
        catch (Exception e) when (e is IOException or SocketException or ObjectDisposedException or OperationCanceledException)
        {
            Fail(e);
        }
        finally
        {
            _sendLock.Release();
        }
        return await pending.Done.Task;
    }

    private async Task ReadRepliesAsync()
    {
        byte[] header = new byte[NbdSimpleReply.Size];
        try
        {
            while (true)
            {
                await _stream.ReadExactlyAsync(header, _closing.Token);
                (uint magic, NbdError error, ulong cookie) = NbdSimpleReply.Parse(header);
                if (magic != NbdMagic.SimpleReply)
                {
                    throw new IOException($"unexpected reply magic 0x{magic:x8}");
                }
                if (!_pending.TryRemove(cookie, out Pending? pending))
                {
                    throw new IOException($"reply for unknown cookie {cookie}");
                }
                if (error == NbdError.None && pending.ReadInto.Length > 0)
                {
                    await _stream.ReadExactlyAsync(pending.ReadInto, _closing.Token);
                }
                pending.Done.TrySetResult(error);
            }
        }
        catch (Exception e)
        {
            Fail(e);
        }
    }

    private void Fail(Exception e)
    {
        _broken ??= e is EndOfStreamException ? new IOException("server closed the connection", e) : e;
        foreach (ulong cookie in _pending.Keys)
        {
            if (_pending.TryRemove(cookie, out Pending? p))
            {
                p.Done.TrySetException(new NbdConnectionLostException(_broken.Message, _broken));
            }
        }
    }

    /// <summary>Sends NBD_CMD_DISC (best effort) and closes.</summary>
    public async Task DisconnectAsync()
    {
        if (_broken is null)
        {
            byte[] frame = new byte[NbdRequest.Size];
            new NbdRequest(NbdMagic.Request, CommandFlags.None, NbdCommand.Disconnect, 0, 0, 0).Write(frame);
            try
            {
                await _sendLock.WaitAsync();
                try
                {
                    using var timeout = new CancellationTokenSource(TimeSpan.FromSeconds(2));
                    await _stream.WriteAsync(frame, timeout.Token);
                }
                finally
                {
                    _sendLock.Release();
                }
            }
            catch (Exception e) when (e is IOException or SocketException or ObjectDisposedException or OperationCanceledException)
            {
                // Already gone; nothing to say goodbye to.
            }
        }
    }

    public async ValueTask DisposeAsync()
    {
        await _closing.CancelAsync();
        _socket.Close();
        if (_reader is not null)
        {
            try
            {
                await _reader;
            }
            catch (Exception e) when (e is IOException or OperationCanceledException or ObjectDisposedException)
            {
                // The reader ends by failing; its failure was handed to the pending requests.
            }
        }
        Fail(new ObjectDisposedException(nameof(NbdClient)));
        if (_stream is not null)
        {
            await _stream.DisposeAsync();
        }
        _closing.Dispose();
        _sendLock.Dispose();
    }
}
