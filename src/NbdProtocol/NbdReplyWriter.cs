using System.Buffers.Binary;
using System.Text.Unicode;

namespace NbdServer.Nbd;

/// <summary>
/// Encodes transmission-phase replies into a caller's buffer. Every method writes a whole reply (or,
/// for a read, everything in front of the data, which the caller sends right behind it without a
/// copy) and returns the number of bytes written.
/// <para>A simple reply (the only kind unless structured replies were negotiated):</para>
/// <code>
///  0                   1                   2                   3
///  0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
/// +---------------------------------------------------------------+
/// |                   magic (0x67446698)                          |
/// +---------------------------------------------------------------+
/// |                   error (32 bits, 0 = success)                |
/// +---------------------------------------------------------------+
/// |                      cookie (64 bits)                         |
/// +---------------------------------------------------------------+
/// (for a successful READ, exactly length bytes of data follow)
/// </code>
/// <para>A structured reply chunk:</para>
/// <code>
/// +---------------------------------------------------------------+
/// |                   magic (0x668e33ef)                          |
/// +-------------------------------+-------------------------------+
/// |        flags (DONE = 1)       |            type               |
/// +-------------------------------+-------------------------------+
/// |                      cookie (64 bits)                         |
/// +---------------------------------------------------------------+
/// |                   payload length (32 bits)                    |
/// +---------------------------------------------------------------+
/// | payload, by type:                                             |
/// |   NONE (0)          empty                                     |
/// |   OFFSET_DATA (1)   offset (64), data (payload length - 8)    |
/// |   BLOCK_STATUS (5)  context id (32), then per descriptor:     |
/// |                     extent length (32), status flags (32)     |
/// |   ERROR (2^15 + 1)  error (32), message length (16), message  |
/// +---------------------------------------------------------------+
/// </code>
/// </summary>
public static class NbdReplyWriter
{
    public const int SimpleReplySize = 16;
    public const int StructuredHeaderSize = 20;

    /// <summary>A structured OFFSET_DATA chunk up to its data: header and the 64-bit offset.</summary>
    public const int OffsetDataHeaderSize = StructuredHeaderSize + OffsetDataOffsetSize;

    /// <summary>Longest message text in an error chunk (the protocol asks for at most 256 bytes).</summary>
    public const int MaxErrorMessageBytes = 256;

    /// <summary>The largest error chunk <see cref="WriteError"/> writes.</summary>
    public const int MaxErrorChunkSize = StructuredHeaderSize + ErrorPrefixSize + MaxErrorMessageBytes;

    // Simple reply.
    private const int SimpleErrorOffset = 4;
    private const int SimpleCookieOffset = 8;

    // Structured chunk header.
    private const int StructuredFlagsOffset = 4;
    private const int StructuredTypeOffset = 6;
    private const int StructuredCookieOffset = 8;
    private const int StructuredLengthOffset = 16;

    // Payloads, relative to the end of the chunk header.
    private const int OffsetDataOffsetSize = 8;
    private const int ErrorCodeOffset = 0;
    private const int ErrorMessageLengthOffset = 4;
    private const int ErrorPrefixSize = 6;
    private const int BlockStatusContextSize = 4;
    private const int BlockStatusDescriptorSize = 8;

    /// <summary>Bytes of a BLOCK_STATUS chunk carrying <paramref name="descriptors"/> descriptors.</summary>
    public static int BlockStatusChunkSize(int descriptors) => StructuredHeaderSize + BlockStatusContextSize + (BlockStatusDescriptorSize * descriptors);

    /// <summary>A simple reply; for a successful READ the data follows it.</summary>
    public static int WriteSimple(Span<byte> destination, ulong cookie, NbdError error)
    {
        BinaryPrimitives.WriteUInt32BigEndian(destination, NbdMagic.SimpleReply);
        BinaryPrimitives.WriteUInt32BigEndian(destination[SimpleErrorOffset..], (uint)error);
        BinaryPrimitives.WriteUInt64BigEndian(destination[SimpleCookieOffset..], cookie);
        return SimpleReplySize;
    }

    /// <summary>A structured chunk header; <paramref name="payloadLength"/> bytes of payload must follow.</summary>
    public static int WriteStructuredHeader(Span<byte> destination, ReplyFlags flags, StructuredReplyType type, ulong cookie, uint payloadLength)
    {
        BinaryPrimitives.WriteUInt32BigEndian(destination, NbdMagic.StructuredReply);
        BinaryPrimitives.WriteUInt16BigEndian(destination[StructuredFlagsOffset..], (ushort)flags);
        BinaryPrimitives.WriteUInt16BigEndian(destination[StructuredTypeOffset..], (ushort)type);
        BinaryPrimitives.WriteUInt64BigEndian(destination[StructuredCookieOffset..], cookie);
        BinaryPrimitives.WriteUInt32BigEndian(destination[StructuredLengthOffset..], payloadLength);
        return StructuredHeaderSize;
    }

    /// <summary>The final NONE chunk: "nothing more for this cookie" (e.g. a read of zero bytes).</summary>
    public static int WriteDone(Span<byte> destination, ulong cookie) =>
        WriteStructuredHeader(destination, ReplyFlags.Done, StructuredReplyType.None, cookie, 0);

    /// <summary>
    /// An OFFSET_DATA chunk up to its data: the caller sends <paramref name="dataLength"/> bytes (at
    /// least one; the protocol forbids an empty data chunk) right after the returned bytes.
    /// </summary>
    public static int WriteOffsetDataHeader(Span<byte> destination, ReplyFlags flags, ulong cookie, ulong offset, uint dataLength)
    {
        ArgumentOutOfRangeException.ThrowIfZero(dataLength);
        ArgumentOutOfRangeException.ThrowIfGreaterThan(dataLength, uint.MaxValue - OffsetDataOffsetSize);
        WriteStructuredHeader(destination, flags, StructuredReplyType.OffsetData, cookie, dataLength + OffsetDataOffsetSize);
        BinaryPrimitives.WriteUInt64BigEndian(destination[StructuredHeaderSize..], offset);
        return OffsetDataHeaderSize;
    }

    /// <summary>
    /// A final ERROR chunk. The message is cut to <see cref="MaxErrorMessageBytes"/> bytes of UTF-8
    /// at a character boundary; <paramref name="destination"/> needs at most <see cref="MaxErrorChunkSize"/>.
    /// </summary>
    public static int WriteError(Span<byte> destination, ulong cookie, NbdError error, ReadOnlySpan<char> message)
    {
        Span<byte> payload = destination[StructuredHeaderSize..];
        Span<byte> text = payload.Slice(ErrorPrefixSize, Math.Min(MaxErrorMessageBytes, payload.Length - ErrorPrefixSize));
        // Stops before the first character that does not fit whole, so a cut never splits one.
        Utf8.FromUtf16(message, text, out _, out int textLength, replaceInvalidSequences: true, isFinalBlock: true);
        BinaryPrimitives.WriteUInt32BigEndian(payload[ErrorCodeOffset..], (uint)error);
        BinaryPrimitives.WriteUInt16BigEndian(payload[ErrorMessageLengthOffset..], (ushort)textLength);
        int payloadLength = ErrorPrefixSize + textLength;
        WriteStructuredHeader(destination, ReplyFlags.Done, StructuredReplyType.Error, cookie, (uint)payloadLength);
        return StructuredHeaderSize + payloadLength;
    }

    /// <summary>A final BLOCK_STATUS chunk for one metadata context (at least one descriptor).</summary>
    public static int WriteBlockStatus(Span<byte> destination, ulong cookie, uint contextId, ReadOnlySpan<BlockStatusDescriptor> descriptors)
    {
        ArgumentOutOfRangeException.ThrowIfZero(descriptors.Length);
        int size = BlockStatusChunkSize(descriptors.Length);
        WriteStructuredHeader(destination, ReplyFlags.Done, StructuredReplyType.BlockStatus, cookie, (uint)(size - StructuredHeaderSize));
        Span<byte> payload = destination[StructuredHeaderSize..size];
        BinaryPrimitives.WriteUInt32BigEndian(payload, contextId);
        for (int i = 0; i < descriptors.Length; i++)
        {
            Span<byte> descriptor = payload.Slice(BlockStatusContextSize + (i * BlockStatusDescriptorSize), BlockStatusDescriptorSize);
            BinaryPrimitives.WriteUInt32BigEndian(descriptor, descriptors[i].Length);
            BinaryPrimitives.WriteUInt32BigEndian(descriptor[4..], descriptors[i].Flags);
        }
        return size;
    }
}

/// <summary>One extent of a BLOCK_STATUS reply: its length and the context's status flags for it.</summary>
public readonly record struct BlockStatusDescriptor(uint Length, uint Flags);

/// <summary>A simple reply as a client reads it (layout: see <see cref="NbdReplyWriter"/>).</summary>
public readonly record struct NbdSimpleReply(uint Magic, NbdError Error, ulong Cookie)
{
    public const int Size = NbdReplyWriter.SimpleReplySize;

    public static NbdSimpleReply Parse(ReadOnlySpan<byte> reply) => new(
        BinaryPrimitives.ReadUInt32BigEndian(reply),
        (NbdError)BinaryPrimitives.ReadUInt32BigEndian(reply[4..]),
        BinaryPrimitives.ReadUInt64BigEndian(reply[8..]));
}
