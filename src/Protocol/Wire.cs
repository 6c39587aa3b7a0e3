namespace NbdServer.Protocol;

/// <summary>
/// The engine ↔ downstairs wire format, version 1. All integers are little-endian (both ends are
/// x86-64/arm64 .NET processes; one byte order everywhere, never mixed).
/// </summary>
/// <remarks>
/// Every message is one frame: a fixed 24-byte header, then <c>length</c> body bytes.
/// <code>
///  0       4       8       10      12      16                      24
///  +-------+-------+-------+-------+-------+-----------------------+
///  | magic | length| type  | result| rsvd  | job id                |
///  | u32   | u32   | u16   | u16   | u32=0 | u64                   |
///  +-------+-------+-------+-------+-------+-----------------------+
///  | body: fixed part for the type, then payload (hashes, data) … |
///  +---------------------------------------------------------------+
/// </code>
/// <c>magic</c> is "DSW1" and doubles as the version guard against a peer speaking something else;
/// <c>length</c> counts body bytes only and is checked against the negotiated maximum before any
/// body byte is buffered. Requests carry <c>result = 0</c>; a reply has the request type | 0x8000,
/// the same job id, and a <see cref="ResultCode"/>. A reply whose result is not <c>Ok</c> has the
/// error body (<c>errno i32, message UTF-8</c>) instead of its normal body.
/// </remarks>
public static class Wire
{
    public const uint Magic = 0x31575344; // "DSW1" read as little-endian bytes 'D' 'S' 'W' '1'
    public const uint ProtocolVersion = 1;
    public const int HeaderSize = 24;

    public const int MagicOffset = 0;
    public const int LengthOffset = 4;
    public const int TypeOffset = 8;
    public const int ResultOffset = 10;
    public const int ReservedOffset = 12;
    public const int JobIdOffset = 16;

    /// <summary>Bytes per block hash on the wire (XxHash3, 64 bits).</summary>
    public const int HashSize = 8;

    /// <summary>Bytes per block context (hash u64, write id u64), on the wire and on disk.</summary>
    public const int ContextSize = 16;

    /// <summary>Longest error message we send; longer ones are cut (a reply must stay small).</summary>
    public const int MaxErrorMessageBytes = 1024;

    /// <summary>Default maximum body size: a 32 MiB write (the largest NBD request) plus hashes.</summary>
    public const int DefaultMaxFrameBytes = (32 << 20) + (1 << 20);

    /// <summary>Smallest maximum either side may announce: a Hello reply for a modest region must fit.</summary>
    public const int MinMaxFrameBytes = 64 << 10;

    /// <summary>Largest maximum either side may announce (a peer announcing more is not believed).</summary>
    public const int MaxMaxFrameBytes = 1 << 30;

    /// <summary>
    /// Most extents, and most blocks per extent, a region may have: a Hello reply announcing more is not
    /// believed, and a region header claiming more is not opened (no peer or corrupt file makes us size absurd tables).
    /// </summary>
    public const int MaxExtentCount = 1 << 20;
    public const int MaxExtentBlocks = 1 << 20;

    /// <summary>Most jobs in flight a peer may announce.</summary>
    public const int MaxJobsLimit = 1 << 20;

    public const ushort ReplyFlag = 0x8000;

    /// <summary>
    /// Highest generation any upstairs may use, and highest a replica may report: 2^63 − 1. Half the
    /// range stays unused so that "highest + 1" can never wrap to 0 (a brick: every later activation
    /// would be older than what the replicas have seen); at one activation per second it lasts 292
    /// billion years.
    /// </summary>
    public const ulong MaxGeneration = long.MaxValue;

    /// <summary>
    /// The flush-number ceiling, 2^63 − 1, itself never used: every flush number accepted, committed or
    /// reported is strictly below it, so "highest + 1" (the upstairs continues from the highest flush
    /// number it finds) never reaches it and never wraps. At a million flushes a second it lasts 292,000 years.
    /// </summary>
    public const ulong MaxFlushNumber = long.MaxValue;

    /// <summary>Default of the downstairs' --max-generation-step and of the engine's tolerance for a replica's generation (see DownstairsOptions.MaxGenerationStep).</summary>
    public const ulong DefaultMaxGenerationStep = 1_000_000;

    /// <summary>
    /// Default of the downstairs' --max-flush-step and of the engine's tolerance for a replica's flush
    /// numbers: 2^40. An honest flush number is the count of flushes in the volume's life, and a replica
    /// (even a blank replacement, at 0) lags the others by at most that count: 2^40 flushes take 35
    /// years at a thousand a second (3.5 at ten thousand). A peer that could jump further would reach
    /// the ceiling with one packet; with this step it needs 2^23 maximal jumps.
    /// </summary>
    public const ulong DefaultMaxFlushStep = 1UL << 40;
}

/// <summary>Message types. Replies use the request type with <see cref="Wire.ReplyFlag"/> set.</summary>
public enum MessageType : ushort
{
    Hello = 1,
    Write = 2,
    Read = 3,
    Flush = 4,
    Ping = 5,
    ExtentRead = 6,
    ExtentWrite = 7,
    ExtentCommit = 8,
    ExtentsPending = 9,

    HelloReply = Hello | Wire.ReplyFlag,
    WriteReply = Write | Wire.ReplyFlag,
    ReadReply = Read | Wire.ReplyFlag,
    FlushReply = Flush | Wire.ReplyFlag,
    PingReply = Ping | Wire.ReplyFlag,
    ExtentReadReply = ExtentRead | Wire.ReplyFlag,
    ExtentWriteReply = ExtentWrite | Wire.ReplyFlag,
    ExtentCommitReply = ExtentCommit | Wire.ReplyFlag,
    ExtentsPendingReply = ExtentsPending | Wire.ReplyFlag,
}

/// <summary>Typed outcome of every reply.</summary>
public enum ResultCode : ushort
{
    Ok = 0,
    /// <summary>ENOSPC / EDQUOT / EFBIG: the downstairs' filesystem is full.</summary>
    NoSpace = 1,
    /// <summary>Any other IO error (EIO…); errno in the error body.</summary>
    IoError = 2,
    /// <summary>A newer generation has taken over the region; this connection may not do IO.</summary>
    Fenced = 3,
    /// <summary>The request is well framed but makes no sense (bad counts, hash mismatch…).</summary>
    Invalid = 4,
    /// <summary>Write-type op on a read-only connection.</summary>
    ReadOnly = 5,
    /// <summary>Blocks or extent beyond the region.</summary>
    OutOfRange = 6,
    /// <summary>Write data does not match the hash sent with it (corruption on the way).</summary>
    HashMismatch = 7,
    /// <summary>Hello named a different region uuid.</summary>
    WrongRegion = 8,
    /// <summary>Hello asked for a protocol version this downstairs does not speak.</summary>
    VersionMismatch = 9,
    /// <summary>The downstairs is shutting down.</summary>
    Unavailable = 10,
}

public static class ResultCodes
{
    public static string Name(ResultCode code) => code switch
    {
        ResultCode.Ok => "ok",
        ResultCode.NoSpace => "no space",
        ResultCode.IoError => "IO error",
        ResultCode.Fenced => "fenced",
        ResultCode.Invalid => "invalid",
        ResultCode.ReadOnly => "read-only",
        ResultCode.OutOfRange => "out of range",
        ResultCode.HashMismatch => "hash mismatch",
        ResultCode.WrongRegion => "wrong region",
        ResultCode.VersionMismatch => "version mismatch",
        ResultCode.Unavailable => "unavailable",
        _ => $"result {(ushort)code}",
    };
}

/// <summary>A frame that breaks the wire rules: the connection that sent it is closed.</summary>
public sealed class DownstairsProtocolException(string message) : Exception(message);
