using System.Buffers.Binary;
using System.Text;
using NbdServer.Common.Volumes;
using NbdServer.Nbd;
using NbdServer.Frontend.Server;
using NbdServer.Frontend.Volumes;

namespace NbdServer.Frontend.Tests;

[CancelAfter(30_000)]
public sealed class TransmissionTests
{
    private const long VolumeSize = 64L << 20;

    private static byte[] Pattern(int length, byte seed)
    {
        byte[] data = new byte[length];
        for (int i = 0; i < length; i++)
        {
            data[i] = (byte)(seed + (i * 7));
        }
        return data;
    }

    [Test]
    public async Task Write_then_read_returns_the_written_bytes_in_a_simple_reply()
    {
        await using var server = new TestServer();
        await using NbdTestClient client = server.Connect();
        await client.ConnectAsync();
        byte[] data = Pattern(12345, 3);
        await client.SendRequestAsync(NbdCommand.Write, 4097, (uint)data.Length, cookie: 1, payload: data);
        Assert.That((await client.ReadSimpleReplyAsync()).Error, Is.EqualTo(NbdError.None));
        await client.SendRequestAsync(NbdCommand.Read, 4097, (uint)data.Length, cookie: 2);
        (NbdError error, ulong cookie, byte[] read) = await client.ReadSimpleReplyAsync(data.Length);
        Assert.That((error, cookie), Is.EqualTo((NbdError.None, 2UL)));
        Assert.That(read, Is.EqualTo(data));
    }

    [Test]
    public async Task Structured_read_is_one_offset_data_chunk_marked_done()
    {
        await using var server = new TestServer();
        await using NbdTestClient client = server.Connect();
        await client.ConnectAsync(structured: true);
        byte[] data = Pattern(8192, 9);
        await client.SendRequestAsync(NbdCommand.Write, 65536, 8192, cookie: 1, payload: data);
        Assert.That((await client.ReadChunkAsync()).Error, Is.EqualTo(NbdError.None));
        await client.SendRequestAsync(NbdCommand.Read, 65536, 8192, cookie: 2, flags: CommandFlags.DontFragment);
        NbdTestClient.ReplyChunk chunk = await client.ReadChunkAsync();
        Assert.That((chunk.Type, chunk.Flags, chunk.Cookie), Is.EqualTo((StructuredReplyType.OffsetData, ReplyFlags.Done, 2UL)));
        Assert.That(BinaryPrimitives.ReadUInt64BigEndian(chunk.Payload), Is.EqualTo(65536UL));
        Assert.That(chunk.Payload[8..], Is.EqualTo(data));
    }

    [Test]
    public async Task Structured_zero_length_read_is_a_single_none_chunk()
    {
        await using var server = new TestServer();
        await using NbdTestClient client = server.Connect();
        await client.ConnectAsync(structured: true);
        await client.SendRequestAsync(NbdCommand.Read, 0, 0, cookie: 5);
        NbdTestClient.ReplyChunk chunk = await client.ReadChunkAsync();
        Assert.That((chunk.Simple, chunk.Type, chunk.Flags, chunk.Payload.Length), Is.EqualTo((false, StructuredReplyType.None, ReplyFlags.Done, 0)));
    }

    // Each case: command, flags, offset, length, expected errno (spec "Error values" and per-command rules).
    [TestCase((ushort)NbdCommand.Read, 0, VolumeSize - 512, 1024u, (uint)NbdError.EINVAL, TestName = "Read_past_the_end_is_EINVAL")]
    [TestCase((ushort)NbdCommand.Read, 0, -11L, 512u, (uint)NbdError.EINVAL, TestName = "Read_whose_offset_plus_length_overflows_is_EINVAL")]
    [TestCase((ushort)NbdCommand.Write, 0, VolumeSize - 512, 1024u, (uint)NbdError.ENOSPC, TestName = "Write_past_the_end_is_ENOSPC")]
    [TestCase((ushort)NbdCommand.Trim, 0, VolumeSize, 1u, (uint)NbdError.EINVAL, TestName = "Trim_past_the_end_is_EINVAL")]
    [TestCase((ushort)NbdCommand.WriteZeroes, 0, VolumeSize - 1, 2u, (uint)NbdError.ENOSPC, TestName = "Write_zeroes_past_the_end_is_ENOSPC")]
    [TestCase((ushort)NbdCommand.Cache, 0, VolumeSize, 4096u, (uint)NbdError.EINVAL, TestName = "Cache_past_the_end_is_EINVAL")]
    [TestCase((ushort)42, 0, 0L, 0u, (uint)NbdError.EINVAL, TestName = "An_unknown_command_is_EINVAL")]
    [TestCase((ushort)NbdCommand.Resize, 0, 0L, 0u, (uint)NbdError.EINVAL, TestName = "Resize_is_EINVAL_because_it_is_not_advertised")]
    [TestCase((ushort)NbdCommand.Read, 0x40, 0L, 512u, (uint)NbdError.EINVAL, TestName = "An_unknown_flag_is_EINVAL")]
    [TestCase((ushort)NbdCommand.Read, (int)CommandFlags.DontFragment, 0L, 512u, (uint)NbdError.EINVAL, TestName = "Df_without_structured_replies_is_EINVAL")]
    [TestCase((ushort)NbdCommand.Write, (int)CommandFlags.NoHole, 0L, 512u, (uint)NbdError.EINVAL, TestName = "No_hole_on_a_write_is_EINVAL")]
    [TestCase((ushort)NbdCommand.Flush, 0, 4096L, 0u, (uint)NbdError.EINVAL, TestName = "Flush_with_a_nonzero_offset_is_EINVAL")]
    [TestCase((ushort)NbdCommand.BlockStatus, 0, 0L, 4096u, (uint)NbdError.EINVAL, TestName = "Block_status_without_a_meta_context_is_EINVAL")]
    [TestCase((ushort)NbdCommand.Read, 0, 0L, (32u << 20) + 1, (uint)NbdError.EINVAL, TestName = "A_read_larger_than_the_maximum_payload_is_EINVAL")]
    [TestCase((ushort)NbdCommand.Write, 0, 0L, (32u << 20) + 1, (uint)NbdError.EINVAL, TestName = "A_write_larger_than_the_maximum_payload_is_EINVAL_and_its_payload_is_skipped")]
    public async Task Invalid_request_gets_its_errno_and_the_connection_stays_usable(ushort commandCode, int flags, long signedOffset, uint length, uint expectedCode)
    {
        var command = (NbdCommand)commandCode;
        var expected = (NbdError)expectedCode;
        ulong offset = unchecked((ulong)signedOffset); // -11 is 2^64 - 11: offset + length overflows
        await using var server = new TestServer();
        await using NbdTestClient client = server.Connect();
        await client.ConnectAsync();
        byte[]? payload = command == NbdCommand.Write ? new byte[length] : null;
        await client.SendRequestAsync(command, offset, length, cookie: 77, flags: (CommandFlags)flags, payload: payload);
        (NbdError error, ulong cookie, _) = await client.ReadSimpleReplyAsync();
        Assert.That((error, cookie), Is.EqualTo((expected, 77UL)));

        await client.SendRequestAsync(NbdCommand.Read, 0, 16, cookie: 78);
        Assert.That((await client.ReadSimpleReplyAsync(16)).Cookie, Is.EqualTo(78UL), "the next request is parsed in sync");
    }

    [TestCase((ushort)NbdCommand.Write, TestName = "Write_on_a_read_only_export_is_EPERM")]
    [TestCase((ushort)NbdCommand.Trim, TestName = "Trim_on_a_read_only_export_is_EPERM")]
    [TestCase((ushort)NbdCommand.WriteZeroes, TestName = "Write_zeroes_on_a_read_only_export_is_EPERM")]
    public async Task Read_only_export_refuses(ushort commandCode)
    {
        var command = (NbdCommand)commandCode;
        await using var server = new TestServer(null, new NbdExport("ro", new MemoryVolume(1 << 20), ReadOnly: true));
        await using NbdTestClient client = server.Connect();
        await client.ConnectAsync();
        await client.SendRequestAsync(command, 0, 512, cookie: 3, payload: command == NbdCommand.Write ? new byte[512] : null);
        Assert.That((await client.ReadSimpleReplyAsync()).Error, Is.EqualTo(NbdError.EPERM));
    }

    [Test]
    public async Task Oversized_read_with_df_is_EOVERFLOW_in_a_structured_error_chunk()
    {
        await using var server = new TestServer();
        await using NbdTestClient client = server.Connect();
        await client.ConnectAsync(structured: true);
        await client.SendRequestAsync(NbdCommand.Read, 0, (32u << 20) + 4096, cookie: 4, flags: CommandFlags.DontFragment);
        NbdTestClient.ReplyChunk chunk = await client.ReadChunkAsync();
        Assert.That((chunk.Type, chunk.Error, chunk.Flags), Is.EqualTo((StructuredReplyType.Error, NbdError.EOVERFLOW, ReplyFlags.Done)));
        int messageLength = BinaryPrimitives.ReadUInt16BigEndian(chunk.Payload.AsSpan(4));
        Assert.That(Encoding.UTF8.GetString(chunk.Payload, 6, messageLength), Does.Contain("exceeds"));
    }

    [Test]
    public async Task Volume_errors_map_to_nbd_errnos()
    {
        var volume = new ScriptedVolume(1 << 20);
        await using var server = new TestServer(null, new NbdExport("vol0", volume));
        await using NbdTestClient client = server.Connect();
        await client.ConnectAsync();
        (VolumeError Error, NbdError Expected)[] cases =
        [
            (VolumeError.NoSpace, NbdError.ENOSPC), (VolumeError.IoError, NbdError.EIO), (VolumeError.ReadOnly, NbdError.EPERM),
            (VolumeError.NotSupported, NbdError.ENOTSUP), (VolumeError.Shutdown, NbdError.ESHUTDOWN), (VolumeError.InvalidArgument, NbdError.EINVAL),
        ];
        foreach ((VolumeError volumeError, NbdError expected) in cases)
        {
            volume.FailWith = new VolumeException(volumeError, "injected");
            await client.SendRequestAsync(NbdCommand.Write, 0, 512, payload: new byte[512]);
            Assert.That((await client.ReadSimpleReplyAsync()).Error, Is.EqualTo(expected), volumeError.ToString());
        }
    }

    [Test]
    public async Task Fast_zero_that_the_volume_cannot_do_fast_is_ENOTSUP()
    {
        var volume = new ScriptedVolume(1 << 20) { FailWith = new VolumeException(VolumeError.NotSupported, "slow") };
        await using var server = new TestServer(null, new NbdExport("vol0", volume));
        await using NbdTestClient client = server.Connect();
        await client.ConnectAsync();
        await client.SendRequestAsync(NbdCommand.WriteZeroes, 0, 4096, flags: CommandFlags.FastZero);
        Assert.That((await client.ReadSimpleReplyAsync()).Error, Is.EqualTo(NbdError.ENOTSUP));
    }

    [Test]
    public async Task Fast_zero_is_refused_when_the_export_does_not_advertise_it()
    {
        var volume = new ScriptedVolume(1 << 20, VolumeFeatures.Flush | VolumeFeatures.WriteZeroes);
        await using var server = new TestServer(null, new NbdExport("vol0", volume));
        await using NbdTestClient client = server.Connect();
        (_, TransmissionFlags flags) = await client.ConnectAsync();
        Assert.That(flags.HasFlag(TransmissionFlags.SendFastZero), Is.False);
        await client.SendRequestAsync(NbdCommand.WriteZeroes, 0, 4096, flags: CommandFlags.FastZero);
        Assert.That((await client.ReadSimpleReplyAsync()).Error, Is.EqualTo(NbdError.ENOTSUP));
    }

    [Test]
    public async Task Write_zeroes_of_4_GiB_zeroes_the_range_without_allocating_it()
    {
        var volume = new MemoryVolume(8L << 30);
        await using var server = new TestServer(null, new NbdExport("big", volume));
        await using NbdTestClient client = server.Connect();
        await client.ConnectAsync();
        byte[] data = Pattern(1 << 20, 1);
        await client.SendRequestAsync(NbdCommand.Write, 1L << 30, (uint)data.Length, payload: data);
        await client.ReadSimpleReplyAsync();
        await client.SendRequestAsync(NbdCommand.WriteZeroes, 4096, uint.MaxValue - 4095, flags: CommandFlags.NoHole | CommandFlags.Fua);
        Assert.That((await client.ReadSimpleReplyAsync()).Error, Is.EqualTo(NbdError.None));
        await client.SendRequestAsync(NbdCommand.Read, 1L << 30, 4096);
        Assert.That((await client.ReadSimpleReplyAsync(4096)).Data, Is.All.EqualTo(0));
        Assert.That(volume.AllocatedBytes, Is.LessThan(1L << 20));
    }

    [Test]
    public async Task Trim_of_several_GiB_is_one_request()
    {
        var volume = new MemoryVolume(8L << 30);
        await using var server = new TestServer(null, new NbdExport("big", volume));
        await using NbdTestClient client = server.Connect();
        await client.ConnectAsync();
        await client.SendRequestAsync(NbdCommand.Write, 3L << 30, 4096, payload: Pattern(4096, 5));
        await client.ReadSimpleReplyAsync();
        await client.SendRequestAsync(NbdCommand.Trim, 0, uint.MaxValue);
        Assert.That((await client.ReadSimpleReplyAsync()).Error, Is.EqualTo(NbdError.None));
        Assert.That(volume.AllocatedBytes, Is.Zero);
    }

    [Test]
    public async Task Block_status_reports_data_and_holes_and_honours_req_one()
    {
        await using var server = new TestServer();
        await using NbdTestClient client = server.Connect();
        await client.ConnectAsync(structured: true, blockStatus: true);
        await client.SendRequestAsync(NbdCommand.Write, 1 << 20, 65536, payload: Pattern(65536, 1));
        await client.ReadChunkAsync();

        await client.SendRequestAsync(NbdCommand.BlockStatus, 0, 4 << 20, cookie: 11);
        NbdTestClient.ReplyChunk chunk = await client.ReadChunkAsync();
        Assert.That((chunk.Type, chunk.Flags, chunk.Cookie), Is.EqualTo((StructuredReplyType.BlockStatus, ReplyFlags.Done, 11UL)));
        Assert.That(BinaryPrimitives.ReadUInt32BigEndian(chunk.Payload), Is.EqualTo(MetaContexts.BaseAllocationId));
        var extents = new List<(uint Length, uint Flags)>();
        for (int at = 4; at < chunk.Payload.Length; at += 8)
        {
            extents.Add((BinaryPrimitives.ReadUInt32BigEndian(chunk.Payload.AsSpan(at)), BinaryPrimitives.ReadUInt32BigEndian(chunk.Payload.AsSpan(at + 4))));
        }
        Assert.That(extents, Is.EqualTo(new[] { (1u << 20, 3u), (65536u, 0u), ((3u << 20) - 65536, 3u) }));

        await client.SendRequestAsync(NbdCommand.BlockStatus, 0, 4 << 20, cookie: 12, flags: CommandFlags.RequestOne);
        NbdTestClient.ReplyChunk one = await client.ReadChunkAsync();
        Assert.That(one.Payload, Has.Length.EqualTo(12), "context id plus exactly one descriptor");
    }

    [Test]
    public async Task Block_status_of_zero_length_is_EINVAL()
    {
        await using var server = new TestServer();
        await using NbdTestClient client = server.Connect();
        await client.ConnectAsync(structured: true, blockStatus: true);
        await client.SendRequestAsync(NbdCommand.BlockStatus, 0, 0);
        Assert.That((await client.ReadChunkAsync()).Error, Is.EqualTo(NbdError.EINVAL));
    }

    [Test]
    public async Task Flush_fua_trim_and_cache_succeed()
    {
        var volume = new ScriptedVolume(1 << 20);
        await using var server = new TestServer(null, new NbdExport("vol0", volume));
        await using NbdTestClient client = server.Connect();
        await client.ConnectAsync();
        await client.SendRequestAsync(NbdCommand.Write, 0, 512, flags: CommandFlags.Fua, payload: new byte[512]);
        await client.SendRequestAsync(NbdCommand.Flush, 0, 0, cookie: 2, flags: CommandFlags.Fua);
        await client.SendRequestAsync(NbdCommand.Trim, 0, 4096, cookie: 3, flags: CommandFlags.Fua);
        await client.SendRequestAsync(NbdCommand.Cache, 0, 4096, cookie: 4);
        var errors = new List<NbdError>();
        for (int i = 0; i < 4; i++)
        {
            errors.Add((await client.ReadSimpleReplyAsync()).Error);
        }
        Assert.That(errors, Is.All.EqualTo(NbdError.None));
        Assert.That(volume.Flushes, Is.EqualTo(1));
    }

    [Test]
    public async Task Replies_go_out_as_requests_complete_not_in_request_order()
    {
        var volume = new ScriptedVolume(1 << 20) { Gate = new TaskCompletionSource(), GatedReadOffset = 0 };
        await using var server = new TestServer(null, new NbdExport("vol0", volume));
        await using NbdTestClient client = server.Connect();
        await client.ConnectAsync();
        await client.SendRequestAsync(NbdCommand.Read, 0, 512, cookie: 1);
        await client.SendRequestAsync(NbdCommand.Read, 4096, 512, cookie: 2);
        Assert.That((await client.ReadSimpleReplyAsync(512)).Cookie, Is.EqualTo(2UL));
        volume.Gate.SetResult();
        Assert.That((await client.ReadSimpleReplyAsync(512)).Cookie, Is.EqualTo(1UL));
    }

    [Test]
    public async Task Disconnect_answers_in_flight_requests_before_closing()
    {
        var volume = new ScriptedVolume(1 << 20) { Gate = new TaskCompletionSource() };
        await using var server = new TestServer(null, new NbdExport("vol0", volume));
        await using NbdTestClient client = server.Connect();
        await client.ConnectAsync();
        await client.SendRequestAsync(NbdCommand.Write, 0, 512, cookie: 1, payload: Pattern(512, 2));
        await client.SendRequestAsync(NbdCommand.Disconnect, 0, 0, cookie: 2);
        await Task.Delay(100);
        volume.Gate.SetResult();
        (NbdError error, ulong cookie, _) = await client.ReadSimpleReplyAsync();
        Assert.That((error, cookie), Is.EqualTo((NbdError.None, 1UL)));
        Assert.That(await client.IsClosedAsync(), Is.True);
    }

    [Test]
    public async Task At_the_byte_budget_the_server_stops_reading_until_replies_drain()
    {
        var volume = new ScriptedVolume(16 << 20) { Gate = new TaskCompletionSource() };
        var options = new FrontendOptions { MaxPayloadBytes = 64 * 1024, MaxInFlightBytesPerConnection = 256 * 1024, MaxInFlightBytesTotal = 1 << 20 };
        await using var server = new TestServer(options, new NbdExport("vol0", volume));
        await using NbdTestClient client = server.Connect();
        await client.ConnectAsync();
        const int Writes = 16;
        // Sent from another task: once the server stops reading, the sender may block, as it should.
        Task sending = Task.Run(async () =>
        {
            for (int i = 0; i < Writes; i++)
            {
                await client.SendRequestAsync(NbdCommand.Write, (ulong)i * 65536, 65536, cookie: (ulong)i, payload: Pattern(65536, (byte)i));
            }
        });
        // The four the budget admits may take a while to start on a loaded machine: waited for, then
        // a fifth (which would break the budget) is given a moment to show.
        await WaitUntilAsync(() => volume.WritesStarted >= 4);
        await Task.Delay(200);
        Assert.That(volume.WritesStarted, Is.EqualTo(4), "256 KiB budget / 64 KiB writes");

        volume.Gate.SetResult();
        await sending.WaitAsync(TimeSpan.FromSeconds(10));
        var cookies = new HashSet<ulong>();
        for (int i = 0; i < Writes; i++)
        {
            (NbdError error, ulong cookie, _) = await client.ReadSimpleReplyAsync();
            Assert.That(error, Is.EqualTo(NbdError.None));
            cookies.Add(cookie);
        }
        Assert.That(cookies, Has.Count.EqualTo(Writes));
        Assert.That(volume.WritesStarted, Is.EqualTo(Writes));
    }

    [Test]
    public async Task A_bad_request_magic_closes_only_that_connection()
    {
        await using var server = new TestServer();
        await using NbdTestClient good = server.Connect();
        await good.ConnectAsync();
        await using NbdTestClient bad = server.Connect();
        await bad.ConnectAsync();
        await bad.SendRequestAsync(NbdCommand.Read, 0, 512, magic: 0xdeadbeef);
        Assert.That(await bad.IsClosedAsync(), Is.True);
        Assert.That(server.Logger.Warnings.Count(w => w.Contains("bad request magic", StringComparison.Ordinal)), Is.EqualTo(1));

        await good.SendRequestAsync(NbdCommand.Read, 0, 512, cookie: 5);
        Assert.That((await good.ReadSimpleReplyAsync(512)).Cookie, Is.EqualTo(5UL));
    }

    [Test]
    public async Task A_connection_cut_in_the_middle_of_a_write_does_not_disturb_the_server()
    {
        await using var server = new TestServer();
        await using (NbdTestClient cut = server.Connect())
        {
            await cut.ConnectAsync();
            byte[] header = new byte[NbdRequest.Size];
            new NbdRequest(NbdMagic.Request, CommandFlags.None, NbdCommand.Write, 1, 0, 4096).Write(header);
            await cut.WriteAsync([.. header, .. new byte[100]]);
        }
        await using NbdTestClient next = server.Connect();
        await next.ConnectAsync();
        await next.SendRequestAsync(NbdCommand.Read, 0, 4096, cookie: 1);
        Assert.That((await next.ReadSimpleReplyAsync(4096)).Data, Is.All.EqualTo(0), "the torn write was never applied");
    }

    [Test]
    public async Task A_flush_on_one_connection_covers_writes_acknowledged_on_another()
    {
        var volume = new ScriptedVolume(1 << 20);
        await using var server = new TestServer(null, new NbdExport("vol0", volume));
        await using NbdTestClient writer = server.Connect();
        (_, TransmissionFlags flags) = await writer.ConnectAsync();
        Assert.That(flags.HasFlag(TransmissionFlags.CanMultiConn), Is.True);
        await using NbdTestClient flusher = server.Connect();
        await flusher.ConnectAsync();
        await writer.SendRequestAsync(NbdCommand.Write, 0, 512, payload: Pattern(512, 1));
        await writer.ReadSimpleReplyAsync();
        await flusher.SendRequestAsync(NbdCommand.Flush, 0, 0);
        Assert.That((await flusher.ReadSimpleReplyAsync()).Error, Is.EqualTo(NbdError.None));
        Assert.That(volume.Flushes, Is.EqualTo(1), "the one shared volume was flushed");
        await flusher.SendRequestAsync(NbdCommand.Read, 0, 512);
        Assert.That((await flusher.ReadSimpleReplyAsync(512)).Data, Is.EqualTo(Pattern(512, 1)));
    }

    [Test]
    public async Task Shutdown_answers_in_flight_requests_and_refuses_new_ones_with_ESHUTDOWN()
    {
        var volume = new ScriptedVolume(1 << 20) { Gate = new TaskCompletionSource() };
        await using var server = new TestServer(null, new NbdExport("vol0", volume));
        await using NbdTestClient client = server.Connect();
        await client.ConnectAsync();
        await client.SendRequestAsync(NbdCommand.Write, 0, 512, cookie: 1, payload: Pattern(512, 4));
        // In flight (at the volume's gate) before the stop, or the stop would refuse it instead.
        await WaitUntilAsync(() => volume.WritesStarted == 1);
        // StopAsync marks every connection as shutting down before it first yields: the next request is refused.
        Task stopping = server.Listener.StopAsync();
        await client.SendRequestAsync(NbdCommand.Read, 0, 512, cookie: 2);
        (NbdError refused, ulong refusedCookie, _) = await client.ReadSimpleReplyAsync();
        Assert.That((refused, refusedCookie), Is.EqualTo((NbdError.ESHUTDOWN, 2UL)));
        volume.Gate.SetResult();
        (NbdError drained, ulong drainedCookie, _) = await client.ReadSimpleReplyAsync();
        Assert.That((drained, drainedCookie), Is.EqualTo((NbdError.None, 1UL)));
        await stopping.WaitAsync(TimeSpan.FromSeconds(15));
        Assert.That(await client.IsClosedAsync(), Is.True);
    }

    /// <summary>Polls (every 20 ms, at most 10 s) until <paramref name="condition"/> holds; fails if it never does.</summary>
    private static async Task WaitUntilAsync(Func<bool> condition)
    {
        for (int i = 0; i < 500 && !condition(); i++)
        {
            await Task.Delay(20);
        }
        Assert.That(condition(), Is.True);
    }
}
