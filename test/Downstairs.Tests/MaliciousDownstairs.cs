using System.Buffers;
using System.Buffers.Binary;
using System.IO.Pipelines;
using NbdServer.Protocol;
using NbdServer.Testing;

namespace NbdServer.Downstairs.Tests;

/// <summary>
/// A downstairs that lies: it answers the Hello (honestly, mutated, or with absurd counts), then
/// answers each request with a random choice of a correct reply, a reply of the wrong length or
/// type, an unknown or repeated job id, an error with a bogus body, a header announcing a huge
/// body, garbage, or nothing. Everything it sends comes from one seeded <see cref="Random"/>.
/// </summary>
internal static class MaliciousDownstairs
{
    /// <summary>
    /// What the Hello reply may do. <see cref="HelloMode.Honest"/> and <see cref="HelloMode.Lying"/>
    /// keep the geometry sane (validating geometry is the ds-harden branch's part);
    /// <see cref="HelloMode.AnyGeometry"/> also lies about block size, extent size and count.
    /// </summary>
    public enum HelloMode
    {
        Honest,
        Lying,
        AnyGeometry,
    }

    public static async Task RunAsync(Stream stream, Random rng, HelloReply honest, HelloMode mode, CancellationToken cancel)
    {
        var reader = PipeReader.Create(stream, new StreamPipeReaderOptions(leaveOpen: true));
        try
        {
            if (!await ReadFrameAsync(reader, cancel).ConfigureAwait(false))
            {
                return;
            }
            await stream.WriteAsync(HelloReplyBytes(rng, honest, mode), cancel).ConfigureAwait(false);
            var answered = new List<ulong>();
            while (true)
            {
                ReadResult result = await reader.ReadAsync(cancel).ConfigureAwait(false);
                ReadOnlySequence<byte> buffer = result.Buffer;
                var replies = new List<byte[]>();
                while (FrameReader.TryRead(ref buffer, 64 << 20, out FrameHeader header, out ReadOnlySequence<byte> body))
                {
                    replies.Add(Reply(rng, header, body, honest.BlockSize, answered));
                    answered.Add(header.JobId);
                }
                reader.AdvanceTo(buffer.Start, buffer.End);
                foreach (byte[] reply in replies)
                {
                    if (reply.Length == 1 && rng.Next(2) == 0)
                    {
                        return; // hang up mid-conversation
                    }
                    await Fuzz.WriteInPiecesAsync(stream, rng, reply, cancel).ConfigureAwait(false);
                }
                if (result.IsCompleted)
                {
                    return;
                }
            }
        }
        catch (Exception e) when (e is IOException or OperationCanceledException or ObjectDisposedException or InvalidOperationException or DownstairsProtocolException)
        {
            // The client hung up on us, as it should on lies.
        }
        finally
        {
            await reader.CompleteAsync().ConfigureAwait(false);
            await stream.DisposeAsync().ConfigureAwait(false);
        }
    }

    private static async Task<bool> ReadFrameAsync(PipeReader reader, CancellationToken cancel)
    {
        while (true)
        {
            ReadResult result = await reader.ReadAsync(cancel).ConfigureAwait(false);
            ReadOnlySequence<byte> buffer = result.Buffer;
            if (FrameReader.TryRead(ref buffer, Wire.MinMaxFrameBytes, out _, out _))
            {
                reader.AdvanceTo(buffer.Start);
                return true;
            }
            reader.AdvanceTo(buffer.Start, buffer.End);
            if (result.IsCompleted)
            {
                return false;
            }
        }
    }

    public static byte[] HelloReplyBytes(Random rng, HelloReply honest, HelloMode mode)
    {
        byte[] Encode(HelloReply reply)
        {
            OutgoingFrame frame = reply.Encode();
            byte[] bytes = frame.Prefix.AsSpan(0, frame.PrefixLength).ToArray();
            frame.ReturnPrefix();
            return bytes;
        }
        // Half the lying sessions get an honest Hello, so the replies that follow get fuzzed too.
        if (mode == HelloMode.Honest || rng.Next(2) == 0)
        {
            return Encode(honest);
        }
        switch (rng.Next(6))
        {
            case 0:
                return Encode(honest with { HighestGeneration = Fuzz.Extreme(rng), MaxJobs = (int)(uint)Fuzz.Extreme(rng), MaxFrameBytes = (int)(uint)Fuzz.Extreme(rng) });
            case 1:
            {
                // An extent count far beyond the body (2^31 - 1 extents in a few bytes): must not be allocated.
                byte[] bytes = Encode(honest);
                BinaryPrimitives.WriteInt32LittleEndian(bytes.AsSpan(Wire.HeaderSize + 32), rng.Next(2) == 0 ? int.MaxValue : (int)(uint)Fuzz.Extreme(rng));
                return bytes;
            }
            case 2:
                return FrameFuzzer.Frame(MessageType.HelloReply, (ResultCode)rng.Next(1, 12), 0, RandomBody(rng, rng.Next(0, 2000)));
            case 3:
                return FrameFuzzer.Frame((MessageType)rng.Next(0, 0x10000), ResultCode.Ok, Fuzz.Extreme(rng), RandomBody(rng, rng.Next(0, 100)));
            case 4 when mode == HelloMode.AnyGeometry:
                return Encode(honest with
                {
                    BlockSize = (int)(uint)Fuzz.Extreme(rng),
                    ExtentBlocks = (int)(uint)Fuzz.Extreme(rng),
                    ExtentCount = honest.ExtentCount,
                });
            default:
            {
                byte[] bytes = Encode(honest);
                return mode == HelloMode.AnyGeometry ? Fuzz.Mutate(rng, bytes) : MutateOutsideGeometry(rng, bytes);
            }
        }
    }

    /// <summary>Mutations that leave block size, extent blocks and extent count alone (body bytes 24..35).</summary>
    private static byte[] MutateOutsideGeometry(Random rng, byte[] bytes)
    {
        byte[] geometry = bytes.AsSpan(Wire.HeaderSize + 24, 12).ToArray();
        byte[] mutated = Fuzz.Mutate(rng, bytes);
        if (mutated.Length >= Wire.HeaderSize + 36)
        {
            geometry.CopyTo(mutated.AsSpan(Wire.HeaderSize + 24));
        }
        return mutated;
    }

    private static byte[] RandomBody(Random rng, int length)
    {
        byte[] body = new byte[length];
        rng.NextBytes(body);
        return body;
    }

    /// <summary>One reply (or lie) to a request; a one-byte array means "hang up".</summary>
    private static byte[] Reply(Random rng, FrameHeader request, ReadOnlySequence<byte> body, int blockSize, List<ulong> answered)
    {
        MessageType replyType = Messages.ReplyTo(request.Type);
        ulong job = request.JobId;
        int requestedBlocks = 1;
        if (request.Type is MessageType.Read && body.Length >= 12)
        {
            var r = new BodyReader(body);
            r.ReadUInt64();
            requestedBlocks = r.ReadInt32();
        }
        else if (request.Type is MessageType.ExtentRead && body.Length >= 12)
        {
            var r = new BodyReader(body);
            r.ReadInt32();
            r.ReadInt32();
            requestedBlocks = r.ReadInt32();
        }
        byte[] correct = Correct(rng, replyType, job, requestedBlocks, blockSize);
        return rng.Next(12) switch
        {
            0 or 1 or 2 or 3 => correct,
            4 => Fuzz.Mutate(rng, correct),
            5 => FrameFuzzer.Frame(replyType, ResultCode.Ok, job, RandomBody(rng, rng.Next(0, 64))),
            6 => FrameFuzzer.Frame(replyType, (ResultCode)rng.Next(1, 0x10000), job, RandomBody(rng, rng.Next(0, 2048))),
            7 => Correct(rng, (MessageType)(rng.Next(1, 10) | Wire.ReplyFlag), answered.Count > 0 && rng.Next(2) == 0 ? answered[rng.Next(answered.Count)] : Fuzz.Extreme(rng), requestedBlocks, blockSize),
            8 => Correct(rng, replyType, job, (int)(uint)Fuzz.Extreme(rng) is var n && n is > 0 and < 64 ? n : requestedBlocks + 1, blockSize),
            9 => HugeHeader(rng, replyType, job),
            10 => RandomBody(rng, rng.Next(1, 64)),
            _ => [0],
        };
    }

    private static byte[] Correct(Random rng, MessageType replyType, ulong job, int blocks, int blockSize)
    {
        blocks = Math.Clamp(blocks, 1, 64);
        switch (replyType)
        {
            case MessageType.ReadReply:
            {
                byte[] body = new byte[8 + (blocks * (Wire.HashSize + blockSize))];
                BinaryPrimitives.WriteInt32LittleEndian(body, blocks);
                rng.NextBytes(body.AsSpan(8));
                return FrameFuzzer.Frame(replyType, ResultCode.Ok, job, body);
            }
            case MessageType.ExtentReadReply:
            {
                byte[] body = new byte[24 + (blocks * (16 + blockSize))];
                BinaryPrimitives.WriteUInt64LittleEndian(body, Fuzz.Extreme(rng));
                BinaryPrimitives.WriteUInt64LittleEndian(body.AsSpan(8), Fuzz.Extreme(rng));
                BinaryPrimitives.WriteInt32LittleEndian(body.AsSpan(20), blocks);
                rng.NextBytes(body.AsSpan(24));
                return FrameFuzzer.Frame(replyType, ResultCode.Ok, job, body);
            }
            case MessageType.PingReply:
                return FrameFuzzer.Frame(replyType, ResultCode.Ok, job, BitConverter.GetBytes(job));
            default:
                return FrameFuzzer.Frame(replyType, ResultCode.Ok, job, []);
        }
    }

    /// <summary>A header announcing a body of up to 4 GiB, then nothing: the client must refuse or wait, not allocate it.</summary>
    private static byte[] HugeHeader(Random rng, MessageType replyType, ulong job)
    {
        byte[] frame = FrameFuzzer.Frame(replyType, ResultCode.Ok, job, []);
        BinaryPrimitives.WriteUInt32LittleEndian(frame.AsSpan(Wire.LengthOffset), rng.Next(2) == 0 ? uint.MaxValue : (uint)rng.Next(1 << 20, int.MaxValue));
        return frame;
    }
}
