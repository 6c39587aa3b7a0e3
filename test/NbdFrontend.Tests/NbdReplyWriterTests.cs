using NbdServer.Nbd;

namespace NbdServer.Frontend.Tests;

/// <summary>The reply encodings byte for byte, as the protocol lays them out.</summary>
public sealed class NbdReplyWriterTests
{
    [Test]
    public void Simple_reply_is_magic_error_and_cookie_in_big_endian()
    {
        byte[] buffer = new byte[NbdReplyWriter.SimpleReplySize];
        int written = NbdReplyWriter.WriteSimple(buffer, cookie: 0x0102030405060708, NbdError.EIO);
        Assert.That(written, Is.EqualTo(16));
        Assert.That(buffer, Is.EqualTo(new byte[]
        {
            0x67, 0x44, 0x66, 0x98, // magic
            0x00, 0x00, 0x00, 0x05, // EIO
            0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, // cookie
        }));
    }

    [Test]
    public void Structured_read_chunk_header_is_offset_data_with_done_and_a_length_counting_the_offset()
    {
        byte[] buffer = new byte[NbdReplyWriter.OffsetDataHeaderSize];
        int written = NbdReplyWriter.WriteOffsetDataHeader(buffer, ReplyFlags.Done, cookie: 9, offset: 0x1000, dataLength: 4096);
        Assert.That(written, Is.EqualTo(28));
        Assert.That(buffer, Is.EqualTo(new byte[]
        {
            0x66, 0x8e, 0x33, 0xef, // magic
            0x00, 0x01, // flags: DONE
            0x00, 0x01, // type: OFFSET_DATA
            0, 0, 0, 0, 0, 0, 0, 9, // cookie
            0x00, 0x00, 0x10, 0x08, // payload length: 8 (offset) + 4096
            0, 0, 0, 0, 0, 0, 0x10, 0x00, // offset
        }));
    }

    [Test]
    public void Structured_read_chunk_of_no_data_is_refused()
    {
        byte[] buffer = new byte[NbdReplyWriter.OffsetDataHeaderSize];
        Assert.Throws<ArgumentOutOfRangeException>(() => NbdReplyWriter.WriteOffsetDataHeader(buffer, ReplyFlags.Done, 1, 0, dataLength: 0));
    }

    [Test]
    public void Done_chunk_is_a_none_chunk_with_an_empty_payload()
    {
        byte[] buffer = new byte[NbdReplyWriter.StructuredHeaderSize];
        int written = NbdReplyWriter.WriteDone(buffer, cookie: 3);
        Assert.That(buffer.AsSpan(0, written).ToArray(), Is.EqualTo(new byte[]
        {
            0x66, 0x8e, 0x33, 0xef, 0x00, 0x01, 0x00, 0x00, 0, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 0,
        }));
    }

    [Test]
    public void Error_chunk_carries_errno_message_length_and_message()
    {
        byte[] buffer = new byte[NbdReplyWriter.MaxErrorChunkSize];
        int written = NbdReplyWriter.WriteError(buffer, cookie: 0xAB, NbdError.ENOSPC, "full");
        Assert.That(buffer.AsSpan(0, written).ToArray(), Is.EqualTo(new byte[]
        {
            0x66, 0x8e, 0x33, 0xef, // magic
            0x00, 0x01, // flags: DONE
            0x80, 0x01, // type: ERROR
            0, 0, 0, 0, 0, 0, 0, 0xAB, // cookie
            0x00, 0x00, 0x00, 0x0A, // payload length: 4 + 2 + 4
            0x00, 0x00, 0x00, 0x1C, // ENOSPC (28)
            0x00, 0x04, // message length
            (byte)'f', (byte)'u', (byte)'l', (byte)'l',
        }));
    }

    [Test]
    public void Error_message_longer_than_256_bytes_is_cut_before_a_character_that_does_not_fit()
    {
        // 255 ASCII bytes, then a 3-byte character that would end at byte 258.
        string message = new string('x', 255) + "\u20ac" + "tail";
        byte[] buffer = new byte[NbdReplyWriter.MaxErrorChunkSize];
        int written = NbdReplyWriter.WriteError(buffer, cookie: 1, NbdError.EIO, message);
        Assert.That(written, Is.EqualTo(NbdReplyWriter.StructuredHeaderSize + 6 + 255));
        Assert.That(buffer[24..26], Is.EqualTo(new byte[] { 0x00, 0xFF }), "message length 255");
    }

    [Test]
    public void Block_status_chunk_lists_the_context_then_length_and_flags_per_descriptor()
    {
        BlockStatusDescriptor[] descriptors = [new(0x10000, MetaContexts.StateHole | MetaContexts.StateZero), new(0x200, 0)];
        byte[] buffer = new byte[NbdReplyWriter.BlockStatusChunkSize(descriptors.Length)];
        int written = NbdReplyWriter.WriteBlockStatus(buffer, cookie: 5, MetaContexts.BaseAllocationId, descriptors);
        Assert.That(written, Is.EqualTo(buffer.Length));
        Assert.That(buffer, Is.EqualTo(new byte[]
        {
            0x66, 0x8e, 0x33, 0xef, 0x00, 0x01, 0x00, 0x05, // magic, DONE, BLOCK_STATUS
            0, 0, 0, 0, 0, 0, 0, 5, // cookie
            0x00, 0x00, 0x00, 0x14, // payload length: 4 + 2 * 8
            0x00, 0x00, 0x00, 0x01, // context id
            0x00, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x03, // 64 KiB, hole | zero
            0x00, 0x00, 0x02, 0x00, 0x00, 0x00, 0x00, 0x00, // 512 bytes, data
        }));
    }

    [Test]
    public void Simple_reply_reads_back_as_written()
    {
        byte[] buffer = new byte[NbdSimpleReply.Size];
        NbdReplyWriter.WriteSimple(buffer, cookie: 77, NbdError.EPERM);
        Assert.That(NbdSimpleReply.Parse(buffer), Is.EqualTo(new NbdSimpleReply(NbdMagic.SimpleReply, NbdError.EPERM, 77)));
    }
}
