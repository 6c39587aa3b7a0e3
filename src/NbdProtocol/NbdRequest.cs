using System.Buffers;
using System.Buffers.Binary;

namespace NbdServer.Nbd;

/// <summary>
/// One transmission-phase request header.
/// <code>
///  0                   1                   2                   3
///  0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
/// +---------------------------------------------------------------+
/// |                   magic (0x25609513)                          |
/// +-------------------------------+-------------------------------+
/// |        command flags          |            type               |
/// +-------------------------------+-------------------------------+
/// |                      cookie (64 bits)                         |
/// +---------------------------------------------------------------+
/// |                      offset (64 bits)                         |
/// +---------------------------------------------------------------+
/// |                      length (32 bits)                         |
/// +---------------------------------------------------------------+
/// (length bytes of payload follow for WRITE)
/// </code>
/// </summary>
public readonly record struct NbdRequest(uint Magic, CommandFlags Flags, NbdCommand Command, ulong Cookie, ulong Offset, uint Length)
{
    public const int Size = 28;

    private const int FlagsOffset = 4;
    private const int TypeOffset = 6;
    private const int CookieOffset = 8;
    private const int OffsetOffset = 16;
    private const int LengthOffset = 24;

    /// <summary>Parses a header from the front of <paramref name="buffer"/>; false (and nothing consumed) if it is short.</summary>
    public static bool TryRead(ref ReadOnlySequence<byte> buffer, out NbdRequest request)
    {
        if (buffer.Length < Size)
        {
            request = default;
            return false;
        }
        Span<byte> header = stackalloc byte[Size];
        buffer.Slice(0, Size).CopyTo(header);
        request = Parse(header);
        buffer = buffer.Slice(Size);
        return true;
    }

    public static NbdRequest Parse(ReadOnlySpan<byte> header) => new(
        BinaryPrimitives.ReadUInt32BigEndian(header),
        (CommandFlags)BinaryPrimitives.ReadUInt16BigEndian(header[FlagsOffset..]),
        (NbdCommand)BinaryPrimitives.ReadUInt16BigEndian(header[TypeOffset..]),
        BinaryPrimitives.ReadUInt64BigEndian(header[CookieOffset..]),
        BinaryPrimitives.ReadUInt64BigEndian(header[OffsetOffset..]),
        BinaryPrimitives.ReadUInt32BigEndian(header[LengthOffset..]));

    public void Write(Span<byte> destination)
    {
        BinaryPrimitives.WriteUInt32BigEndian(destination, Magic);
        BinaryPrimitives.WriteUInt16BigEndian(destination[FlagsOffset..], (ushort)Flags);
        BinaryPrimitives.WriteUInt16BigEndian(destination[TypeOffset..], (ushort)Command);
        BinaryPrimitives.WriteUInt64BigEndian(destination[CookieOffset..], Cookie);
        BinaryPrimitives.WriteUInt64BigEndian(destination[OffsetOffset..], Offset);
        BinaryPrimitives.WriteUInt32BigEndian(destination[LengthOffset..], Length);
    }
}
