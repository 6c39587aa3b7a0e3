using System.Buffers.Binary;
using System.Text;
using NbdServer.Nbd;

namespace NbdServer.Frontend.Tests;

/// <summary>
/// A deliberately literal NBD client for protocol tests: it writes exactly the bytes a test asks
/// for (valid or not) and parses what comes back, so every handshake path can be driven by hand.
/// </summary>
internal sealed class NbdTestClient(Stream stream) : IAsyncDisposable
{
    public Stream Stream { get; } = stream;

    public async Task<ushort> ReadGreetingAsync()
    {
        byte[] greeting = await ReadExactlyAsync(18);
        Assert.That(BinaryPrimitives.ReadUInt64BigEndian(greeting), Is.EqualTo(NbdMagic.InitPassword), "NBDMAGIC");
        Assert.That(BinaryPrimitives.ReadUInt64BigEndian(greeting.AsSpan(8)), Is.EqualTo(NbdMagic.Option), "IHAVEOPT");
        return BinaryPrimitives.ReadUInt16BigEndian(greeting.AsSpan(16));
    }

    public Task SendClientFlagsAsync(uint flags) => WriteAsync(BigEndian32(flags));

    /// <summary>Greeting plus client flags FIXED_NEWSTYLE | NO_ZEROES.</summary>
    public async Task StartAsync(uint flags = 3)
    {
        await ReadGreetingAsync();
        await SendClientFlagsAsync(flags);
    }

    public async Task SendOptionAsync(NbdOption option, byte[] data, ulong magic = NbdMagic.Option)
    {
        byte[] header = new byte[16];
        BinaryPrimitives.WriteUInt64BigEndian(header, magic);
        BinaryPrimitives.WriteUInt32BigEndian(header.AsSpan(8), (uint)option);
        BinaryPrimitives.WriteUInt32BigEndian(header.AsSpan(12), (uint)data.Length);
        await WriteAsync([.. header, .. data]);
    }

    public async Task<OptionReply> ReadOptionReplyAsync()
    {
        byte[] header = await ReadExactlyAsync(20);
        Assert.That(BinaryPrimitives.ReadUInt64BigEndian(header), Is.EqualTo(NbdMagic.OptionReply), "option reply magic");
        var option = (NbdOption)BinaryPrimitives.ReadUInt32BigEndian(header.AsSpan(8));
        var type = (OptionReplyType)BinaryPrimitives.ReadUInt32BigEndian(header.AsSpan(12));
        int length = (int)BinaryPrimitives.ReadUInt32BigEndian(header.AsSpan(16));
        return new OptionReply(option, type, await ReadExactlyAsync(length));
    }

    /// <summary>Reads replies to one option until its final one (ACK or an error).</summary>
    public async Task<List<OptionReply>> ReadOptionRepliesAsync()
    {
        var replies = new List<OptionReply>();
        while (true)
        {
            OptionReply reply = await ReadOptionReplyAsync();
            replies.Add(reply);
            if (reply.Type == OptionReplyType.Ack || ((uint)reply.Type & 0x8000_0000) != 0)
            {
                return replies;
            }
        }
    }

    public static byte[] InfoRequest(string name, params InfoType[] requests)
    {
        byte[] nameBytes = Encoding.UTF8.GetBytes(name);
        byte[] data = new byte[4 + nameBytes.Length + 2 + (2 * requests.Length)];
        BinaryPrimitives.WriteUInt32BigEndian(data, (uint)nameBytes.Length);
        nameBytes.CopyTo(data, 4);
        BinaryPrimitives.WriteUInt16BigEndian(data.AsSpan(4 + nameBytes.Length), (ushort)requests.Length);
        for (int i = 0; i < requests.Length; i++)
        {
            BinaryPrimitives.WriteUInt16BigEndian(data.AsSpan(6 + nameBytes.Length + (2 * i)), (ushort)requests[i]);
        }
        return data;
    }

    public static byte[] MetaContextRequest(string export, params string[] queries)
    {
        var data = new List<byte>();
        data.AddRange(BigEndian32((uint)Encoding.UTF8.GetByteCount(export)));
        data.AddRange(Encoding.UTF8.GetBytes(export));
        data.AddRange(BigEndian32((uint)queries.Length));
        foreach (string query in queries)
        {
            data.AddRange(BigEndian32((uint)Encoding.UTF8.GetByteCount(query)));
            data.AddRange(Encoding.UTF8.GetBytes(query));
        }
        return [.. data];
    }

    /// <summary>Handshake to transmission with GO (optionally structured replies and base:allocation).</summary>
    public async Task<(ulong Size, TransmissionFlags Flags)> ConnectAsync(string export = "", bool structured = false, bool blockStatus = false)
    {
        await StartAsync();
        if (structured)
        {
            await SendOptionAsync(NbdOption.StructuredReply, []);
            Assert.That((await ReadOptionReplyAsync()).Type, Is.EqualTo(OptionReplyType.Ack));
        }
        if (blockStatus)
        {
            await SendOptionAsync(NbdOption.SetMetaContext, MetaContextRequest(export, "base:allocation"));
            List<OptionReply> contexts = await ReadOptionRepliesAsync();
            Assert.That(contexts[^1].Type, Is.EqualTo(OptionReplyType.Ack));
        }
        await SendOptionAsync(NbdOption.Go, InfoRequest(export));
        List<OptionReply> replies = await ReadOptionRepliesAsync();
        Assert.That(replies[^1].Type, Is.EqualTo(OptionReplyType.Ack), "GO must succeed");
        OptionReply info = replies.Single(r => r.Type == OptionReplyType.Info && BinaryPrimitives.ReadUInt16BigEndian(r.Data) == (ushort)InfoType.Export);
        return (BinaryPrimitives.ReadUInt64BigEndian(info.Data.AsSpan(2)), (TransmissionFlags)BinaryPrimitives.ReadUInt16BigEndian(info.Data.AsSpan(10)));
    }

    public async Task SendRequestAsync(NbdCommand command, ulong offset, uint length, ulong cookie = 1, CommandFlags flags = CommandFlags.None, byte[]? payload = null, uint magic = NbdMagic.Request)
    {
        byte[] header = new byte[NbdRequest.Size];
        new NbdRequest(magic, flags, command, cookie, offset, length).Write(header);
        await WriteAsync(payload is null ? header : [.. header, .. payload]);
    }

    /// <summary>A simple reply; <paramref name="dataLength"/> bytes follow it when it reports success to a READ.</summary>
    public async Task<(NbdError Error, ulong Cookie, byte[] Data)> ReadSimpleReplyAsync(int dataLength = 0)
    {
        byte[] header = await ReadExactlyAsync(16);
        Assert.That(BinaryPrimitives.ReadUInt32BigEndian(header), Is.EqualTo(NbdMagic.SimpleReply), "simple reply magic");
        var error = (NbdError)BinaryPrimitives.ReadUInt32BigEndian(header.AsSpan(4));
        ulong cookie = BinaryPrimitives.ReadUInt64BigEndian(header.AsSpan(8));
        byte[] data = error == NbdError.None ? await ReadExactlyAsync(dataLength) : [];
        return (error, cookie, data);
    }

    /// <summary>Reads either kind of reply message (a structured chunk, or a simple reply without data).</summary>
    public async Task<ReplyChunk> ReadChunkAsync()
    {
        byte[] magicBytes = await ReadExactlyAsync(4);
        uint magic = BinaryPrimitives.ReadUInt32BigEndian(magicBytes);
        if (magic == NbdMagic.SimpleReply)
        {
            byte[] rest = await ReadExactlyAsync(12);
            return new ReplyChunk(true, ReplyFlags.Done, StructuredReplyType.None, BinaryPrimitives.ReadUInt64BigEndian(rest.AsSpan(4)), [], (NbdError)BinaryPrimitives.ReadUInt32BigEndian(rest));
        }
        Assert.That(magic, Is.EqualTo(NbdMagic.StructuredReply), "reply magic");
        byte[] header = await ReadExactlyAsync(16);
        var flags = (ReplyFlags)BinaryPrimitives.ReadUInt16BigEndian(header);
        var type = (StructuredReplyType)BinaryPrimitives.ReadUInt16BigEndian(header.AsSpan(2));
        ulong cookie = BinaryPrimitives.ReadUInt64BigEndian(header.AsSpan(4));
        int length = (int)BinaryPrimitives.ReadUInt32BigEndian(header.AsSpan(12));
        byte[] payload = await ReadExactlyAsync(length);
        NbdError error = ((ushort)type & 0x8000) != 0 ? (NbdError)BinaryPrimitives.ReadUInt32BigEndian(payload) : NbdError.None;
        return new ReplyChunk(false, flags, type, cookie, payload, error);
    }

    public async Task WriteAsync(byte[] bytes)
    {
        await Stream.WriteAsync(bytes);
        await Stream.FlushAsync();
    }

    public async Task<byte[]> ReadExactlyAsync(int count)
    {
        byte[] buffer = new byte[count];
        await Stream.ReadExactlyAsync(buffer).AsTask().WaitAsync(TimeSpan.FromSeconds(10));
        return buffer;
    }

    /// <summary>True when the server closed the connection (EOF) within the timeout.</summary>
    public async Task<bool> IsClosedAsync(TimeSpan? timeout = null)
    {
        byte[] one = new byte[1];
        try
        {
            int read = await Stream.ReadAsync(one).AsTask().WaitAsync(timeout ?? TimeSpan.FromSeconds(5));
            return read == 0;
        }
        catch (IOException)
        {
            return true;
        }
    }

    public ValueTask DisposeAsync() => Stream.DisposeAsync();

    public static byte[] BigEndian32(uint value)
    {
        byte[] bytes = new byte[4];
        BinaryPrimitives.WriteUInt32BigEndian(bytes, value);
        return bytes;
    }

    public sealed record OptionReply(NbdOption Option, OptionReplyType Type, byte[] Data)
    {
        public string Text => Encoding.UTF8.GetString(Data);
    }

    public sealed record ReplyChunk(bool Simple, ReplyFlags Flags, StructuredReplyType Type, ulong Cookie, byte[] Payload, NbdError Error);
}
