using System.Buffers;
using System.Buffers.Binary;

namespace NbdServer.Protocol;

/// <summary>A decoded frame header; <see cref="BodyLength"/> bytes of body follow it.</summary>
public readonly record struct FrameHeader(MessageType Type, ResultCode Result, ulong JobId, int BodyLength)
{
    public bool IsReply => ((ushort)Type & Wire.ReplyFlag) != 0;
}

/// <summary>Splits a byte stream into frames (see the diagram on <see cref="Wire"/>).</summary>
public static class FrameReader
{
    /// <summary>
    /// Takes one whole frame off the front of <paramref name="buffer"/>. Returns false (buffer untouched)
    /// when the frame is not complete yet. The header is validated as soon as its 24 bytes are there —
    /// before waiting for the body — so a bogus length can never make us buffer gigabytes.
    /// </summary>
    /// <exception cref="DownstairsProtocolException">The header breaks the rules; close the connection.</exception>
    public static bool TryRead(ref ReadOnlySequence<byte> buffer, int maxBodyBytes, out FrameHeader header, out ReadOnlySequence<byte> body)
    {
        body = default;
        header = default;
        if (buffer.Length < Wire.HeaderSize)
        {
            return false;
        }
        Span<byte> raw = stackalloc byte[Wire.HeaderSize];
        buffer.Slice(0, Wire.HeaderSize).CopyTo(raw);
        header = ParseHeader(raw, maxBodyBytes);
        if (buffer.Length - Wire.HeaderSize < header.BodyLength)
        {
            return false;
        }
        body = buffer.Slice(Wire.HeaderSize, header.BodyLength);
        buffer = buffer.Slice(body.End);
        return true;
    }

    public static FrameHeader ParseHeader(ReadOnlySpan<byte> raw, int maxBodyBytes)
    {
        uint magic = BinaryPrimitives.ReadUInt32LittleEndian(raw[Wire.MagicOffset..]);
        if (magic != Wire.Magic)
        {
            throw new DownstairsProtocolException($"bad frame magic 0x{magic:x8} (expected 0x{Wire.Magic:x8}; not a downstairs peer, or the stream lost sync)");
        }
        uint length = BinaryPrimitives.ReadUInt32LittleEndian(raw[Wire.LengthOffset..]);
        if (length > (uint)maxBodyBytes)
        {
            throw new DownstairsProtocolException($"frame body of {length:N0} bytes exceeds the maximum of {maxBodyBytes:N0}");
        }
        var type = (MessageType)BinaryPrimitives.ReadUInt16LittleEndian(raw[Wire.TypeOffset..]);
        if (!Enum.IsDefined(type))
        {
            throw new DownstairsProtocolException($"unknown message type 0x{(ushort)type:x4}");
        }
        var result = (ResultCode)BinaryPrimitives.ReadUInt16LittleEndian(raw[Wire.ResultOffset..]);
        uint reserved = BinaryPrimitives.ReadUInt32LittleEndian(raw[Wire.ReservedOffset..]);
        if (reserved != 0)
        {
            throw new DownstairsProtocolException($"reserved header field is 0x{reserved:x8}, must be 0");
        }
        ulong jobId = BinaryPrimitives.ReadUInt64LittleEndian(raw[Wire.JobIdOffset..]);
        return new FrameHeader(type, result, jobId, (int)length);
    }

    public static void WriteHeader(Span<byte> destination, MessageType type, ResultCode result, ulong jobId, int bodyLength)
    {
        BinaryPrimitives.WriteUInt32LittleEndian(destination[Wire.MagicOffset..], Wire.Magic);
        BinaryPrimitives.WriteUInt32LittleEndian(destination[Wire.LengthOffset..], (uint)bodyLength);
        BinaryPrimitives.WriteUInt16LittleEndian(destination[Wire.TypeOffset..], (ushort)type);
        BinaryPrimitives.WriteUInt16LittleEndian(destination[Wire.ResultOffset..], (ushort)result);
        BinaryPrimitives.WriteUInt32LittleEndian(destination[Wire.ReservedOffset..], 0);
        BinaryPrimitives.WriteUInt64LittleEndian(destination[Wire.JobIdOffset..], jobId);
    }
}

/// <summary>
/// One frame ready to send: header + fixed body in a pooled prefix, then up to two payload
/// segments sent straight from the caller's memory (gather write: never copied into the frame).
/// </summary>
public sealed class OutgoingFrame
{
    /// <summary>False for a frame whose prefix is its own, kept for reuse (see <see cref="CreateReusable"/>).</summary>
    private readonly bool _pooledPrefix;

    private OutgoingFrame(byte[] prefix, int prefixLength, bool pooledPrefix)
    {
        Prefix = prefix;
        PrefixLength = prefixLength;
        _pooledPrefix = pooledPrefix;
    }

    public byte[] Prefix { get; }

    public int PrefixLength { get; private set; }

    public ReadOnlyMemory<byte> Payload1 { get; private set; }

    public ReadOnlyMemory<byte> Payload2 { get; private set; }

    /// <summary>Runs once the frame is on the wire, or when it is dropped because the link closed.</summary>
    public Action<OutgoingFrame, bool>? Completed { get; set; }

    public object? State { get; set; }

    public int TotalLength => PrefixLength + Payload1.Length + Payload2.Length;

    /// <summary>Builds a frame: <paramref name="writeFixed"/> fills the fixed body right after the header.</summary>
    public static OutgoingFrame Create<TState>(MessageType type, ResultCode result, ulong jobId, int fixedLength, TState state,
        SpanAction<byte, TState> writeFixed, ReadOnlyMemory<byte> payload1 = default, ReadOnlyMemory<byte> payload2 = default)
    {
        int prefixLength = Wire.HeaderSize + fixedLength;
        var frame = new OutgoingFrame(ArrayPool<byte>.Shared.Rent(prefixLength), prefixLength, pooledPrefix: true);
        frame.Fill(type, result, jobId, fixedLength, state, writeFixed, payload1, payload2);
        return frame;
    }

    public static OutgoingFrame Create(MessageType type, ResultCode result, ulong jobId, ReadOnlyMemory<byte> payload1 = default, ReadOnlyMemory<byte> payload2 = default) =>
        Create(type, result, jobId, 0, 0, static (_, _) => { }, payload1, payload2);

    /// <summary>
    /// A frame object its owner refills with <see cref="Reset"/> for one job after another (no allocation
    /// per job); <paramref name="maxFixedLength"/> bounds the fixed body it can hold.
    /// </summary>
    internal static OutgoingFrame CreateReusable(int maxFixedLength) => new(new byte[Wire.HeaderSize + maxFixedLength], 0, pooledPrefix: false);

    /// <summary>Refills a reusable frame; only once the sender has finished with its previous contents (its <see cref="Completed"/> ran).</summary>
    internal void Reset<TState>(MessageType type, ResultCode result, ulong jobId, int fixedLength, TState state,
        SpanAction<byte, TState> writeFixed, ReadOnlyMemory<byte> payload1 = default, ReadOnlyMemory<byte> payload2 = default)
    {
        if (Wire.HeaderSize + fixedLength > Prefix.Length)
        {
            throw new ArgumentException($"a {fixedLength}-byte fixed body does not fit this frame", nameof(fixedLength));
        }
        Fill(type, result, jobId, fixedLength, state, writeFixed, payload1, payload2);
    }

    /// <summary>Drops the payload references (the owner's memory) of a frame kept for reuse.</summary>
    internal void ClearPayloads()
    {
        Payload1 = default;
        Payload2 = default;
    }

    private void Fill<TState>(MessageType type, ResultCode result, ulong jobId, int fixedLength, TState state,
        SpanAction<byte, TState> writeFixed, ReadOnlyMemory<byte> payload1, ReadOnlyMemory<byte> payload2)
    {
        long bodyLength = (long)fixedLength + payload1.Length + payload2.Length;
        if (bodyLength > int.MaxValue)
        {
            throw new ArgumentException("frame body too large");
        }
        PrefixLength = Wire.HeaderSize + fixedLength;
        FrameReader.WriteHeader(Prefix, type, result, jobId, (int)bodyLength);
        writeFixed(Prefix.AsSpan(Wire.HeaderSize, fixedLength), state);
        Payload1 = payload1;
        Payload2 = payload2;
    }

    /// <summary>Gives the pooled prefix back; for a frame that is encoded but never handed to a <see cref="FrameSender"/> (which returns it itself).</summary>
    public void ReturnPrefix()
    {
        if (_pooledPrefix)
        {
            ArrayPool<byte>.Shared.Return(Prefix);
        }
    }
}

/// <summary>Forward-only reader over a frame body (which may span pipe segments).</summary>
public ref struct BodyReader(ReadOnlySequence<byte> body)
{
    private SequenceReader<byte> _reader = new(body);

    public readonly long Remaining => _reader.Remaining;

    public readonly ReadOnlySequence<byte> Rest => _reader.UnreadSequence;

    public uint ReadUInt32() => _reader.TryReadLittleEndian(out int v) ? (uint)v : throw Short();

    public int ReadInt32() => _reader.TryReadLittleEndian(out int v) ? v : throw Short();

    public ulong ReadUInt64() => _reader.TryReadLittleEndian(out long v) ? (ulong)v : throw Short();

    public Guid ReadGuid()
    {
        Span<byte> raw = stackalloc byte[16];
        if (!_reader.TryCopyTo(raw))
        {
            throw Short();
        }
        _reader.Advance(16);
        return new Guid(raw, bigEndian: true);
    }

    public ReadOnlySequence<byte> ReadBytes(long length)
    {
        if (_reader.Remaining < length)
        {
            throw Short();
        }
        ReadOnlySequence<byte> slice = _reader.UnreadSequence.Slice(0, length);
        _reader.Advance(length);
        return slice;
    }

    private static DownstairsProtocolException Short() => new("frame body shorter than its message type requires");
}
