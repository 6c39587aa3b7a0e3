using System.Buffers;
using System.Buffers.Binary;
using NbdServer.Protocol;

namespace NbdServer.Downstairs.Tests;

[CancelAfter(10_000)]
public sealed class CodecTests
{
    private static byte[] Bytes(OutgoingFrame f)
    {
        byte[] all = [.. f.Prefix.AsSpan(0, f.PrefixLength), .. f.Payload1.Span, .. f.Payload2.Span];
        f.ReturnPrefix();
        return all;
    }

    private static (FrameHeader Header, ReadOnlySequence<byte> Body) ReadOne(byte[] bytes)
    {
        var seq = new ReadOnlySequence<byte>(bytes);
        Assert.That(FrameReader.TryRead(ref seq, Wire.DefaultMaxFrameBytes, out FrameHeader h, out ReadOnlySequence<byte> body), Is.True);
        Assert.That(seq.IsEmpty, Is.True, "exactly one frame");
        return (h, body);
    }

    [Test]
    public void Hello_round_trips()
    {
        var hello = new HelloRequest(Wire.ProtocolVersion, true, Guid.NewGuid(), Guid.NewGuid(), Guid.NewGuid(), 42);
        (FrameHeader h, ReadOnlySequence<byte> body) = ReadOne(Bytes(hello.Encode()));
        Assert.That(h.Type, Is.EqualTo(MessageType.Hello));
        Assert.That(HelloRequest.Parse(body), Is.EqualTo(hello));
    }

    [Test]
    public void Hello_reply_round_trips_with_extent_state()
    {
        // Full-width values where the wire allows them; generations stay at or below the highest (a real region's).
        ExtentMeta[] extents = [new(1, 2, false), new(3, 4, true), new(Wire.MaxGeneration - 1, Wire.MaxFlushNumber - 1, true)];
        var reply = new HelloReply(1, false, Guid.NewGuid(), 4096, 8192, 3, 1 << 20, 100, Wire.MaxGeneration - 1, extents);
        (FrameHeader h, ReadOnlySequence<byte> body) = ReadOne(Bytes(reply.Encode()));
        HelloReply parsed = HelloReply.Parse(body);
        Assert.That(h.Type, Is.EqualTo(MessageType.HelloReply));
        Assert.That(parsed.Extents, Is.EqualTo(extents));
        Assert.That(parsed with { Extents = extents }, Is.EqualTo(reply with { Extents = extents }));
    }

    [Test]
    public void Write_frame_carries_range_hashes_and_data_gathered()
    {
        byte[] hashes = [1, 2, 3, 4, 5, 6, 7, 8];
        byte[] data = new byte[512];
        Random.Shared.NextBytes(data);
        var range = new BlockRange(12345678901, 1);
        OutgoingFrame f = OutgoingFrame.Create(MessageType.Write, ResultCode.Ok, 99, BlockRange.FixedSize, range, static (d, r) => r.Write(d), hashes, data);
        Assert.That(f.Payload2.ToArray(), Is.EqualTo(data), "payload is sent from the caller's memory, not copied into the frame");
        (FrameHeader h, ReadOnlySequence<byte> body) = ReadOne(Bytes(f));
        var r = new BodyReader(body);
        Assert.That(h.JobId, Is.EqualTo(99UL));
        Assert.That(BlockRange.Read(ref r, "Write"), Is.EqualTo(range));
        Assert.That(r.ReadBytes(8).ToArray(), Is.EqualTo(hashes));
        Assert.That(r.ReadBytes(512).ToArray(), Is.EqualTo(data));
    }

    [Test]
    public void Error_reply_round_trips_errno_and_message()
    {
        (FrameHeader h, ReadOnlySequence<byte> body) = ReadOne(Bytes(ErrorBody.Encode(MessageType.WriteReply, 5, ResultCode.NoSpace, 28, "ENOSPC writing extent 3")));
        Assert.That(h.Result, Is.EqualTo(ResultCode.NoSpace));
        Assert.That(ErrorBody.Parse(body), Is.EqualTo(new ErrorBody(28, "ENOSPC writing extent 3")));
    }

    [Test]
    public void Error_message_is_capped()
    {
        (_, ReadOnlySequence<byte> body) = ReadOne(Bytes(ErrorBody.Encode(MessageType.WriteReply, 5, ResultCode.IoError, 5, new string('x', 100_000))));
        Assert.That(body.Length, Is.LessThanOrEqualTo(4 + Wire.MaxErrorMessageBytes));
    }

    [Test]
    public void TryRead_returns_false_on_every_short_prefix()
    {
        byte[] frame = Bytes(new HelloRequest(1, false, Guid.Empty, Guid.NewGuid(), Guid.NewGuid(), 1).Encode());
        for (int n = 0; n < frame.Length; n++)
        {
            var seq = new ReadOnlySequence<byte>(frame.AsMemory(0, n));
            Assert.That(FrameReader.TryRead(ref seq, 1 << 20, out _, out _), Is.False, $"{n} bytes");
            Assert.That(seq.Length, Is.EqualTo(n), "buffer untouched");
        }
    }

    [Test]
    public void Oversized_length_is_rejected_from_the_header_alone()
    {
        byte[] header = new byte[Wire.HeaderSize];
        FrameReader.WriteHeader(header, MessageType.Write, ResultCode.Ok, 1, 100 << 20);
        var seq = new ReadOnlySequence<byte>(header);
        Assert.That(() => FrameReader.TryRead(ref seq, 1 << 20, out _, out _),
            Throws.TypeOf<DownstairsProtocolException>().With.Message.Contains("exceeds the maximum"));
    }

    [TestCase(0, "bad frame magic")]
    [TestCase(Wire.TypeOffset, "unknown message type")]
    [TestCase(Wire.ReservedOffset, "reserved header field")]
    public void Corrupt_header_field_is_rejected(int offset, string expected)
    {
        byte[] frame = Bytes(OutgoingFrame.Create(MessageType.Flush, ResultCode.Ok, 1));
        BinaryPrimitives.WriteUInt16LittleEndian(frame.AsSpan(offset), 0x7777);
        var seq = new ReadOnlySequence<byte>(frame);
        Assert.That(() => FrameReader.TryRead(ref seq, 1 << 20, out _, out _), Throws.TypeOf<DownstairsProtocolException>().With.Message.Contains(expected));
    }

    [Test]
    public void Frame_split_across_segments_is_read_whole()
    {
        byte[] a = Bytes(new HelloRequest(1, false, Guid.Empty, Guid.NewGuid(), Guid.NewGuid(), 9).Encode());
        byte[] b = Bytes(OutgoingFrame.Create(MessageType.Flush, ResultCode.Ok, 77));
        byte[] all = [.. a, .. b];
        ReadOnlySequence<byte> seq = Segments.Create(all, 7);
        Assert.That(FrameReader.TryRead(ref seq, 1 << 20, out FrameHeader h1, out ReadOnlySequence<byte> body1), Is.True);
        Assert.That(HelloRequest.Parse(body1).Generation, Is.EqualTo(9UL));
        Assert.That(FrameReader.TryRead(ref seq, 1 << 20, out FrameHeader h2, out _), Is.True);
        Assert.That((h1.Type, h2.Type, h2.JobId), Is.EqualTo((MessageType.Hello, MessageType.Flush, 77UL)));
    }

    private sealed class Segments : ReadOnlySequenceSegment<byte>
    {
        private Segments(ReadOnlyMemory<byte> memory, long runningIndex)
        {
            Memory = memory;
            RunningIndex = runningIndex;
        }

        public static ReadOnlySequence<byte> Create(byte[] data, int size)
        {
            var first = new Segments(data.AsMemory(0, Math.Min(size, data.Length)), 0);
            Segments last = first;
            for (int i = size; i < data.Length; i += size)
            {
                var next = new Segments(data.AsMemory(i, Math.Min(size, data.Length - i)), i);
                last.Next = next;
                last = next;
            }
            return new ReadOnlySequence<byte>(first, 0, last, last.Memory.Length);
        }
    }
}
