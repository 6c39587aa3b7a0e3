using System.Buffers.Binary;
using NbdServer.Protocol;
using NbdServer.Testing;

namespace NbdServer.Downstairs.Tests;

/// <summary>
/// Builds downstairs frames for the fuzz tests: every message type, well-formed or not, with boundary
/// values in block, count, extent and generation fields, optionally mutated afterwards.
/// </summary>
internal static class FrameFuzzer
{
    public static byte[] Frame(MessageType type, ResultCode result, ulong jobId, ReadOnlySpan<byte> body)
    {
        byte[] frame = new byte[Wire.HeaderSize + body.Length];
        FrameReader.WriteHeader(frame, type, result, jobId, body.Length);
        body.CopyTo(frame.AsSpan(Wire.HeaderSize));
        return frame;
    }

    public static byte[] Hello(bool readOnly, ulong generation, Guid upstairs, Guid? region = null)
    {
        byte[] body = new byte[HelloRequest.BodySize];
        BinaryPrimitives.WriteUInt32LittleEndian(body, Wire.ProtocolVersion);
        BinaryPrimitives.WriteUInt32LittleEndian(body.AsSpan(4), readOnly ? HelloRequest.ReadOnlyFlag : 0);
        (region ?? Guid.Empty).TryWriteBytes(body.AsSpan(8), bigEndian: true, out _);
        upstairs.TryWriteBytes(body.AsSpan(24), bigEndian: true, out _);
        Guid.NewGuid().TryWriteBytes(body.AsSpan(40), bigEndian: true, out _);
        BinaryPrimitives.WriteUInt64LittleEndian(body.AsSpan(56), generation);
        return Frame(MessageType.Hello, ResultCode.Ok, 0, body);
    }

    /// <summary>
    /// A request of a random type with random, often boundary, fields. With
    /// <paramref name="avoidRangeOverflow"/>, a Write/Read never has first block + count beyond
    /// <see cref="long.MaxValue"/> (the overflow the ds-harden branch fixes kills the process today).
    /// </summary>
    public static byte[] Request(Random rng, int blockSize, long blockCount, int extentCount, bool avoidRangeOverflow)
    {
        ulong jobId = rng.Next(4) == 0 ? Fuzz.Extreme(rng) : (ulong)rng.Next(1, 1000);
        var type = (MessageType)(rng.Next(12) switch
        {
            < 9 and var t => t + 1,
            9 => rng.Next(1, 10) | Wire.ReplyFlag,
            10 => rng.Next(0, 0x10000),
            _ => rng.Next(2, 10),
        });
        switch (type)
        {
            case MessageType.Write or MessageType.Read:
            {
                int count = rng.Next(5) == 0 ? (int)(uint)Fuzz.Extreme(rng) : rng.Next(1, 5);
                long first = BlockNumber(rng, blockCount);
                if (avoidRangeOverflow && count > 0 && first > long.MaxValue - count)
                {
                    first = long.MaxValue - count;
                }
                int payloadBlocks = type == MessageType.Write ? Math.Clamp(count, 0, 4) : 0;
                byte[] body = new byte[BlockRange.FixedSize + (payloadBlocks * (Wire.HashSize + blockSize))];
                BinaryPrimitives.WriteInt64LittleEndian(body, first);
                BinaryPrimitives.WriteInt32LittleEndian(body.AsSpan(8), count);
                if (payloadBlocks > 0)
                {
                    Span<byte> data = body.AsSpan(BlockRange.FixedSize + (payloadBlocks * Wire.HashSize));
                    rng.NextBytes(data);
                    // Mostly correct hashes, so writes get past the hash check to the range checks.
                    if (rng.Next(4) != 0)
                    {
                        BlockContext.HashBlocks(data, blockSize, body.AsSpan(BlockRange.FixedSize, payloadBlocks * Wire.HashSize));
                    }
                }
                return Frame(type, ResultCode.Ok, jobId, body);
            }
            case MessageType.Flush:
            {
                byte[] body = new byte[FlushRequest.BodySize];
                BinaryPrimitives.WriteUInt64LittleEndian(body, Fuzz.Extreme(rng));
                BinaryPrimitives.WriteUInt64LittleEndian(body.AsSpan(8), Fuzz.Extreme(rng));
                return Frame(type, ResultCode.Ok, jobId, body);
            }
            case MessageType.Ping:
                return Frame(type, ResultCode.Ok, jobId, BitConverter.GetBytes(Fuzz.Extreme(rng)));
            case MessageType.ExtentRead or MessageType.ExtentWrite:
            {
                int extent = ExtentNumber(rng, extentCount);
                int first = rng.Next(3) == 0 ? (int)(uint)Fuzz.Extreme(rng) : rng.Next(0, 8);
                int count = rng.Next(3) == 0 ? (int)(uint)Fuzz.Extreme(rng) : rng.Next(1, 4);
                int payloadBlocks = type == MessageType.ExtentWrite ? Math.Clamp(count, 0, 3) : 0;
                byte[] body = new byte[ExtentRange.FixedSize + (payloadBlocks * (BlockContext.Size + blockSize))];
                BinaryPrimitives.WriteInt32LittleEndian(body, extent);
                BinaryPrimitives.WriteInt32LittleEndian(body.AsSpan(4), first);
                BinaryPrimitives.WriteInt32LittleEndian(body.AsSpan(8), count);
                BinaryPrimitives.WriteUInt32LittleEndian(body.AsSpan(12), (uint)rng.Next(4));
                rng.NextBytes(body.AsSpan(ExtentRange.FixedSize));
                return Frame(type, ResultCode.Ok, jobId, body);
            }
            case MessageType.ExtentCommit:
            {
                byte[] body = new byte[ExtentCommitRequest.BodySize];
                BinaryPrimitives.WriteInt32LittleEndian(body, ExtentNumber(rng, extentCount));
                BinaryPrimitives.WriteUInt32LittleEndian(body.AsSpan(4), (uint)rng.Next(4));
                BinaryPrimitives.WriteUInt64LittleEndian(body.AsSpan(8), Fuzz.Extreme(rng));
                BinaryPrimitives.WriteUInt64LittleEndian(body.AsSpan(16), Fuzz.Extreme(rng));
                return Frame(type, ResultCode.Ok, jobId, body);
            }
            case MessageType.ExtentsPending:
            {
                int count = rng.Next(4) == 0 ? (int)(uint)Fuzz.Extreme(rng) : rng.Next(0, 5);
                int listed = Math.Clamp(count, 0, 8);
                byte[] body = new byte[4 + (4 * listed)];
                BinaryPrimitives.WriteInt32LittleEndian(body, count);
                for (int i = 0; i < listed; i++)
                {
                    BinaryPrimitives.WriteInt32LittleEndian(body.AsSpan(4 + (4 * i)), ExtentNumber(rng, extentCount));
                }
                return Frame(type, ResultCode.Ok, jobId, body);
            }
            default:
            {
                // Hello again, a reply, or a type nobody defined: a random body.
                byte[] body = new byte[rng.Next(0, 80)];
                rng.NextBytes(body);
                return Frame(type, (ResultCode)rng.Next(0, 12), jobId, body);
            }
        }
    }

    /// <summary>Near the region's ends, at 2^62/2^63 boundaries, or anywhere.</summary>
    public static long BlockNumber(Random rng, long blockCount) => rng.Next(6) switch
    {
        0 => rng.NextInt64(0, blockCount),
        1 => blockCount + rng.Next(-3, 4),
        2 => long.MaxValue - rng.Next(0, 5),
        3 => (long)Fuzz.Extreme(rng),
        4 => (1L << 62) + rng.Next(-2, 3),
        _ => rng.Next(0, 4),
    };

    public static int ExtentNumber(Random rng, int extentCount) => rng.Next(5) switch
    {
        0 => extentCount + rng.Next(-1, 3),
        1 => (int)(uint)Fuzz.Extreme(rng),
        2 => -rng.Next(1, 3),
        _ => rng.Next(0, extentCount),
    };

    /// <summary>The frames of one fuzz connection after its Hello, a few of them mutated.</summary>
    public static byte[] Session(Random rng, int blockSize, long blockCount, int extentCount, bool avoidRangeOverflow)
    {
        var bytes = new List<byte>();
        int frames = rng.Next(1, 12);
        for (int i = 0; i < frames; i++)
        {
            byte[] frame = Request(rng, blockSize, blockCount, extentCount, avoidRangeOverflow);
            bytes.AddRange(rng.Next(4) == 0 ? Fuzz.Mutate(rng, frame) : frame);
        }
        if (rng.Next(8) == 0)
        {
            byte[] garbage = new byte[rng.Next(1, 64)];
            rng.NextBytes(garbage);
            bytes.AddRange(garbage);
        }
        return [.. bytes];
    }

    /// <summary>
    /// Walks <paramref name="stream"/> as the server will frame it and lowers the first block of any
    /// Write/Read whose first block + count would overflow (see <see cref="Request"/>): the CI run keeps
    /// clear of the one known process-killing input, whatever the mutations made of the bytes.
    /// </summary>
    public static void AvoidRangeOverflow(byte[] stream, int maxFrameBytes)
    {
        int at = 0;
        while (stream.Length - at >= Wire.HeaderSize)
        {
            FrameHeader header;
            try
            {
                header = FrameReader.ParseHeader(stream.AsSpan(at, Wire.HeaderSize), maxFrameBytes);
            }
            catch (DownstairsProtocolException)
            {
                return; // the server closes here
            }
            Span<byte> body = stream.AsSpan(at + Wire.HeaderSize, (int)Math.Min(header.BodyLength, stream.Length - at - Wire.HeaderSize));
            if (header.Type is MessageType.Write or MessageType.Read && body.Length >= 12)
            {
                long first = BinaryPrimitives.ReadInt64LittleEndian(body);
                int count = BinaryPrimitives.ReadInt32LittleEndian(body[8..]);
                if (count > 0 && first > long.MaxValue - count)
                {
                    BinaryPrimitives.WriteInt64LittleEndian(body, long.MaxValue - count);
                }
            }
            at += Wire.HeaderSize + header.BodyLength;
        }
    }
}
