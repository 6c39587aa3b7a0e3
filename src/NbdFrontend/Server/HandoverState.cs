using System.Buffers.Binary;
using System.Text;
using NbdServer.Nbd;

namespace NbdServer.Frontend.Server;

/// <summary>A connection stopped between two requests, its socket open: what becomes a <see cref="HandedSession"/>.</summary>
internal sealed record HandedConnection(System.Net.Sockets.Socket Socket, byte[] Pending, NegotiatedSession Session);

/// <summary>A listening socket handed to the next image: which listener it is, and its descriptor.</summary>
internal sealed record HandedListener(HandedListenerKind Kind, int Fd);

internal enum HandedListenerKind : uint
{
    Tcp = 1,
    Unix = 2,
}

/// <summary>
/// A client in the transmission phase, handed to the next image between two requests: what was
/// negotiated, and the bytes already read from its socket that no request took yet (the start of
/// its next requests, possibly cut mid-header).
/// </summary>
internal sealed record HandedSession(int Fd, string ExportName, TransmissionFlags Flags, bool StructuredReplies, bool BaseAllocation, byte[] Pending);

/// <summary>
/// What one nbd-server image leaves the next when it reloads (SIGHUP): the listening sockets and
/// the attached clients, whose descriptors survive the exec. Written into a memory file whose
/// descriptor number the next image finds in <see cref="Handover.EnvironmentVariable"/>.
/// <code>
/// header (24 bytes)
///  0               8       12      16      20      24
///  +---------------+-------+-------+-------+-------+
///  | magic (64)    |version|lstnrs |sessns |reservd|
///  +---------------+-------+-------+-------+-------+
/// listener (8 bytes each): kind (32: 1 TCP, 2 Unix), descriptor (32)
/// session (16 bytes + name + pending, each):
///  +-------+-------+---+---+-------+-----------+---------------+
///  | fd(32)|pending| tflags| opts  | name len  | name, pending |
///  |       |len(32)| (16)  | (16)  |  (32)     |   bytes       |
///  +-------+-------+-------+-------+-----------+---------------+
///  opts: bit 0 structured replies, bit 1 base:allocation negotiated
/// </code>
/// Integers are big-endian like the rest of NBD. The reader trusts nothing it cannot check: counts,
/// lengths and descriptors are bounded, and a short or malformed document is refused as a whole.
/// </summary>
internal sealed record HandoverState(IReadOnlyList<HandedListener> Listeners, IReadOnlyList<HandedSession> Sessions)
{
    /// <summary>"NBDHANDO" in ASCII.</summary>
    public const ulong Magic = 0x4E42_4448_414E_444F;
    public const uint Version = 1;
    public const int HeaderSize = 24;
    public const int ListenerSize = 8;
    public const int SessionFixedSize = 16;

    /// <summary>A TCP and a Unix listener at most.</summary>
    public const int MaxListeners = 2;

    /// <summary>Sessions per document: above any connection cap the server accepts.</summary>
    public const int MaxSessions = 65536;

    /// <summary>An export name's limit in the handshake (NBD_MAX_STRING_LENGTH).</summary>
    public const int MaxNameBytes = 4096;

    /// <summary>What a connection may have buffered: a few read segments, plus a largest write's payload.</summary>
    public const int MaxPendingBytes = 64 << 20;

    /// <summary>The largest document written or read: it is held in memory whole.</summary>
    public const int MaxDocumentBytes = 1 << 30;

    private const ushort StructuredRepliesBit = 1;
    private const ushort BaseAllocationBit = 2;

    public byte[] ToBytes()
    {
        long size = HeaderSize + ((long)Listeners.Count * ListenerSize);
        foreach (HandedSession s in Sessions)
        {
            size += SessionFixedSize + Encoding.UTF8.GetByteCount(s.ExportName) + (long)s.Pending.Length;
        }
        if (size > MaxDocumentBytes)
        {
            throw new InvalidOperationException($"a handover of {size} bytes is above the {MaxDocumentBytes}-byte limit");
        }
        byte[] bytes = new byte[size];
        Span<byte> span = bytes;
        BinaryPrimitives.WriteUInt64BigEndian(span, Magic);
        BinaryPrimitives.WriteUInt32BigEndian(span[8..], Version);
        BinaryPrimitives.WriteUInt32BigEndian(span[12..], (uint)Listeners.Count);
        BinaryPrimitives.WriteUInt32BigEndian(span[16..], (uint)Sessions.Count);
        span = span[HeaderSize..];
        foreach (HandedListener l in Listeners)
        {
            BinaryPrimitives.WriteUInt32BigEndian(span, (uint)l.Kind);
            BinaryPrimitives.WriteInt32BigEndian(span[4..], l.Fd);
            span = span[ListenerSize..];
        }
        foreach (HandedSession s in Sessions)
        {
            int nameLength = Encoding.UTF8.GetBytes(s.ExportName, span[SessionFixedSize..]);
            BinaryPrimitives.WriteInt32BigEndian(span, s.Fd);
            BinaryPrimitives.WriteUInt32BigEndian(span[4..], (uint)s.Pending.Length);
            BinaryPrimitives.WriteUInt16BigEndian(span[8..], (ushort)s.Flags);
            BinaryPrimitives.WriteUInt16BigEndian(span[10..], (ushort)((s.StructuredReplies ? StructuredRepliesBit : 0) | (s.BaseAllocation ? BaseAllocationBit : 0)));
            BinaryPrimitives.WriteUInt32BigEndian(span[12..], (uint)nameLength);
            span = span[(SessionFixedSize + nameLength)..];
            s.Pending.CopyTo(span);
            span = span[s.Pending.Length..];
        }
        return bytes;
    }

    /// <summary>Parses a whole document; false with the reason when it is short, too long or malformed.</summary>
    public static bool TryRead(ReadOnlySpan<byte> bytes, out HandoverState? state, out string error)
    {
        state = null;
        if (bytes.Length < HeaderSize)
        {
            error = $"{bytes.Length} bytes, shorter than the {HeaderSize}-byte header";
            return false;
        }
        if (BinaryPrimitives.ReadUInt64BigEndian(bytes) != Magic)
        {
            error = "bad magic";
            return false;
        }
        uint version = BinaryPrimitives.ReadUInt32BigEndian(bytes[8..]);
        if (version != Version)
        {
            error = $"version {version}; this build reads version {Version}";
            return false;
        }
        uint listenerCount = BinaryPrimitives.ReadUInt32BigEndian(bytes[12..]);
        uint sessionCount = BinaryPrimitives.ReadUInt32BigEndian(bytes[16..]);
        if (listenerCount > MaxListeners || sessionCount > MaxSessions)
        {
            error = $"{listenerCount} listeners and {sessionCount} sessions, above the limits ({MaxListeners}, {MaxSessions})";
            return false;
        }
        ReadOnlySpan<byte> rest = bytes[HeaderSize..];
        var listeners = new List<HandedListener>((int)listenerCount);
        for (int i = 0; i < listenerCount; i++)
        {
            if (rest.Length < ListenerSize)
            {
                error = $"listener {i} cut short";
                return false;
            }
            uint kind = BinaryPrimitives.ReadUInt32BigEndian(rest);
            int fd = BinaryPrimitives.ReadInt32BigEndian(rest[4..]);
            if (kind is not ((uint)HandedListenerKind.Tcp or (uint)HandedListenerKind.Unix) || fd < 0)
            {
                error = $"listener {i}: kind {kind}, descriptor {fd}";
                return false;
            }
            listeners.Add(new HandedListener((HandedListenerKind)kind, fd));
            rest = rest[ListenerSize..];
        }
        var sessions = new List<HandedSession>((int)Math.Min(sessionCount, 1024));
        for (int i = 0; i < sessionCount; i++)
        {
            if (rest.Length < SessionFixedSize)
            {
                error = $"session {i} cut short";
                return false;
            }
            int fd = BinaryPrimitives.ReadInt32BigEndian(rest);
            uint pendingLength = BinaryPrimitives.ReadUInt32BigEndian(rest[4..]);
            var flags = (TransmissionFlags)BinaryPrimitives.ReadUInt16BigEndian(rest[8..]);
            ushort options = BinaryPrimitives.ReadUInt16BigEndian(rest[10..]);
            uint nameLength = BinaryPrimitives.ReadUInt32BigEndian(rest[12..]);
            if (fd < 0 || nameLength > MaxNameBytes || pendingLength > MaxPendingBytes || (options & ~(StructuredRepliesBit | BaseAllocationBit)) != 0)
            {
                error = $"session {i}: descriptor {fd}, name of {nameLength} bytes, {pendingLength} pending bytes, options 0x{options:x}";
                return false;
            }
            rest = rest[SessionFixedSize..];
            if (rest.Length < nameLength + (long)pendingLength)
            {
                error = $"session {i} cut short";
                return false;
            }
            string name = Encoding.UTF8.GetString(rest[..(int)nameLength]);
            byte[] pending = rest.Slice((int)nameLength, (int)pendingLength).ToArray();
            rest = rest[(int)(nameLength + pendingLength)..];
            sessions.Add(new HandedSession(fd, name, flags, (options & StructuredRepliesBit) != 0, (options & BaseAllocationBit) != 0, pending));
        }
        if (!rest.IsEmpty)
        {
            error = $"{rest.Length} bytes after the last session";
            return false;
        }
        error = "";
        state = new HandoverState(listeners, sessions);
        return true;
    }
}
