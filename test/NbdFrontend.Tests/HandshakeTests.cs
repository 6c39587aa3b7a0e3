using System.Buffers.Binary;
using System.Text;
using NbdServer.Nbd;
using NbdServer.Frontend.Server;
using NbdServer.Frontend.Volumes;
using static NbdServer.Frontend.Tests.NbdTestClient;

namespace NbdServer.Frontend.Tests;

[CancelAfter(20_000)]
public sealed class HandshakeTests
{
    private TestServer _server = null!;

    [SetUp]
    public void SetUp() => _server = new TestServer(
        null,
        new NbdExport("vol0", new MemoryVolume(64L << 20), "the default volume"),
        new NbdExport("archive", new MemoryVolume(1L << 20), "read-only copy", ReadOnly: true));

    [TearDown]
    public async Task TearDown() => await _server.DisposeAsync();

    [Test]
    public async Task Greeting_advertises_fixed_newstyle_and_no_zeroes()
    {
        await using NbdTestClient client = _server.Connect();
        ushort flags = await client.ReadGreetingAsync();
        Assert.That((HandshakeFlags)flags, Is.EqualTo(HandshakeFlags.FixedNewstyle | HandshakeFlags.NoZeroes));
    }

    [Test]
    public async Task Unknown_client_flags_close_the_connection_with_one_warning()
    {
        await using NbdTestClient client = _server.Connect();
        await client.ReadGreetingAsync();
        await client.SendClientFlagsAsync(0x8000_0003);
        Assert.That(await client.IsClosedAsync(), Is.True);
        Assert.That(_server.Logger.Warnings.Count(w => w.Contains("unknown client flags", StringComparison.Ordinal)), Is.EqualTo(1));
    }

    [Test]
    public async Task Export_name_enters_transmission_with_size_flags_and_124_zero_bytes()
    {
        await using NbdTestClient client = _server.Connect();
        await client.StartAsync(flags: 1); // fixed newstyle, no NO_ZEROES
        await client.SendOptionAsync(NbdOption.ExportName, Encoding.UTF8.GetBytes("vol0"));
        byte[] reply = await client.ReadExactlyAsync(8 + 2 + 124);
        Assert.That(BinaryPrimitives.ReadUInt64BigEndian(reply), Is.EqualTo(64UL << 20));
        var flags = (TransmissionFlags)BinaryPrimitives.ReadUInt16BigEndian(reply.AsSpan(8));
        Assert.That(flags.HasFlag(TransmissionFlags.HasFlags | TransmissionFlags.SendFlush | TransmissionFlags.CanMultiConn), Is.True);
        Assert.That(reply.Skip(10), Is.All.EqualTo(0));

        await client.SendRequestAsync(NbdCommand.Read, 0, 512, cookie: 7);
        (NbdError error, ulong cookie, byte[] data) = await client.ReadSimpleReplyAsync(512);
        Assert.That((error, cookie, data.Length), Is.EqualTo((NbdError.None, 7UL, 512)));
    }

    [Test]
    public async Task Export_name_with_no_zeroes_sends_only_size_and_flags()
    {
        await using NbdTestClient client = _server.Connect();
        await client.StartAsync();
        await client.SendOptionAsync(NbdOption.ExportName, []);
        byte[] reply = await client.ReadExactlyAsync(10);
        Assert.That(BinaryPrimitives.ReadUInt64BigEndian(reply), Is.EqualTo(64UL << 20), "empty name is the default export");
        await client.SendRequestAsync(NbdCommand.Flush, 0, 0, cookie: 9);
        Assert.That((await client.ReadSimpleReplyAsync()).Cookie, Is.EqualTo(9UL), "the next bytes are a reply, not padding");
    }

    [Test]
    public async Task Export_name_for_an_unknown_export_closes_the_session()
    {
        await using NbdTestClient client = _server.Connect();
        await client.StartAsync();
        await client.SendOptionAsync(NbdOption.ExportName, Encoding.UTF8.GetBytes("nope"));
        Assert.That(await client.IsClosedAsync(), Is.True);
    }

    [Test]
    public async Task Abort_is_acknowledged_and_the_session_ends()
    {
        await using NbdTestClient client = _server.Connect();
        await client.StartAsync();
        await client.SendOptionAsync(NbdOption.Abort, []);
        Assert.That((await client.ReadOptionReplyAsync()).Type, Is.EqualTo(OptionReplyType.Ack));
        Assert.That(await client.IsClosedAsync(), Is.True);
    }

    [Test]
    public async Task List_names_every_export_with_its_description_then_acks()
    {
        await using NbdTestClient client = _server.Connect();
        await client.StartAsync();
        await client.SendOptionAsync(NbdOption.List, []);
        List<OptionReply> replies = await client.ReadOptionRepliesAsync();
        Assert.That(replies.Select(r => r.Type), Is.EqualTo(new[] { OptionReplyType.Server, OptionReplyType.Server, OptionReplyType.Ack }));
        string[] names = [.. replies.SkipLast(1).Select(r => Encoding.UTF8.GetString(r.Data, 4, (int)BinaryPrimitives.ReadUInt32BigEndian(r.Data)))];
        Assert.That(names, Is.EqualTo(new[] { "vol0", "archive" }));
        Assert.That(Encoding.UTF8.GetString(replies[0].Data.AsSpan(8)), Is.EqualTo("the default volume"));
    }

    [Test]
    public async Task List_with_data_is_invalid_and_the_session_continues()
    {
        await using NbdTestClient client = _server.Connect();
        await client.StartAsync();
        await client.SendOptionAsync(NbdOption.List, [1, 2, 3]);
        Assert.That((await client.ReadOptionReplyAsync()).Type, Is.EqualTo(OptionReplyType.ErrInvalid));
        await client.SendOptionAsync(NbdOption.List, []);
        Assert.That((await client.ReadOptionRepliesAsync())[^1].Type, Is.EqualTo(OptionReplyType.Ack));
    }

    [Test]
    public async Task Go_without_info_requests_answers_export_info_only_as_the_kernel_client_needs()
    {
        await using NbdTestClient client = _server.Connect();
        await client.StartAsync();
        await client.SendOptionAsync(NbdOption.Go, InfoRequest("vol0"));
        List<OptionReply> replies = await client.ReadOptionRepliesAsync();
        Assert.That(replies.Select(r => r.Type), Is.EqualTo(new[] { OptionReplyType.Info, OptionReplyType.Ack }));
        Assert.That(BinaryPrimitives.ReadUInt16BigEndian(replies[0].Data), Is.EqualTo((ushort)InfoType.Export));
        Assert.That(replies[0].Data, Has.Length.EqualTo(12));
    }

    [Test]
    public async Task Info_answers_name_description_and_block_sizes_when_asked_and_stays_in_negotiation()
    {
        await using NbdTestClient client = _server.Connect();
        await client.StartAsync();
        await client.SendOptionAsync(NbdOption.Info, InfoRequest("", InfoType.Name, InfoType.Description, InfoType.BlockSize, (InfoType)999));
        List<OptionReply> replies = await client.ReadOptionRepliesAsync();
        Dictionary<InfoType, byte[]> infos = replies.Where(r => r.Type == OptionReplyType.Info)
            .ToDictionary(r => (InfoType)BinaryPrimitives.ReadUInt16BigEndian(r.Data), r => r.Data[2..]);
        Assert.That(infos.Keys, Is.EquivalentTo(new[] { InfoType.Export, InfoType.Name, InfoType.Description, InfoType.BlockSize }));
        Assert.That(Encoding.UTF8.GetString(infos[InfoType.Name]), Is.EqualTo("vol0"));
        Assert.That(Encoding.UTF8.GetString(infos[InfoType.Description]), Is.EqualTo("the default volume"));
        uint min = BinaryPrimitives.ReadUInt32BigEndian(infos[InfoType.BlockSize]);
        uint preferred = BinaryPrimitives.ReadUInt32BigEndian(infos[InfoType.BlockSize].AsSpan(4));
        uint max = BinaryPrimitives.ReadUInt32BigEndian(infos[InfoType.BlockSize].AsSpan(8));
        Assert.That((min, preferred, max), Is.EqualTo((1u, 4096u, 32u << 20)));

        // INFO does not end negotiation: GO still works.
        await client.SendOptionAsync(NbdOption.Go, InfoRequest("vol0"));
        Assert.That((await client.ReadOptionRepliesAsync())[^1].Type, Is.EqualTo(OptionReplyType.Ack));
    }

    [Test]
    public async Task Go_for_an_unknown_export_is_ERR_UNKNOWN_and_the_session_continues()
    {
        await using NbdTestClient client = _server.Connect();
        await client.StartAsync();
        await client.SendOptionAsync(NbdOption.Go, InfoRequest("missing"));
        Assert.That((await client.ReadOptionReplyAsync()).Type, Is.EqualTo(OptionReplyType.ErrUnknown));
        await client.SendOptionAsync(NbdOption.Go, InfoRequest("vol0"));
        Assert.That((await client.ReadOptionRepliesAsync())[^1].Type, Is.EqualTo(OptionReplyType.Ack));
    }

    [TestCase(new byte[] { 0, 0, 0, 9, 0, 0 }, TestName = "Go_whose_name_length_overruns_the_data_is_ERR_INVALID")]
    [TestCase(new byte[] { 0, 0, 0, 0, 0, 2, 0, 1 }, TestName = "Go_whose_request_count_overruns_the_data_is_ERR_INVALID")]
    [TestCase(new byte[] { 0, 0 }, TestName = "Go_with_truncated_data_is_ERR_INVALID")]
    [TestCase(new byte[] { 0, 0, 0, 1, 0, 0, 0 }, TestName = "Go_with_a_NUL_in_the_name_is_ERR_INVALID")]
    public async Task Malformed_go(byte[] data)
    {
        await using NbdTestClient client = _server.Connect();
        await client.StartAsync();
        await client.SendOptionAsync(NbdOption.Go, data);
        Assert.That((await client.ReadOptionReplyAsync()).Type, Is.EqualTo(OptionReplyType.ErrInvalid));
    }

    [TestCase(11u, TestName = "Extended_headers_are_ERR_UNSUP")]
    [TestCase(4u, TestName = "Peek_export_is_ERR_UNSUP")]
    [TestCase(4242u, TestName = "An_unknown_option_is_ERR_UNSUP_and_the_session_continues")]
    public async Task Unsupported_option(uint code)
    {
        var option = (NbdOption)code;
        await using NbdTestClient client = _server.Connect();
        await client.StartAsync();
        await client.SendOptionAsync(option, [0, 0, 0, 0]);
        OptionReply reply = await client.ReadOptionReplyAsync();
        Assert.That((reply.Option, reply.Type), Is.EqualTo((option, OptionReplyType.ErrUnsupported)));
        await client.SendOptionAsync(NbdOption.List, []);
        Assert.That((await client.ReadOptionRepliesAsync())[^1].Type, Is.EqualTo(OptionReplyType.Ack));
    }

    [Test]
    public async Task Structured_reply_with_data_is_ERR_INVALID()
    {
        await using NbdTestClient client = _server.Connect();
        await client.StartAsync();
        await client.SendOptionAsync(NbdOption.StructuredReply, [1]);
        Assert.That((await client.ReadOptionReplyAsync()).Type, Is.EqualTo(OptionReplyType.ErrInvalid));
    }

    [Test]
    public async Task Meta_context_before_structured_replies_is_ERR_INVALID()
    {
        await using NbdTestClient client = _server.Connect();
        await client.StartAsync();
        await client.SendOptionAsync(NbdOption.SetMetaContext, MetaContextRequest("vol0", "base:allocation"));
        Assert.That((await client.ReadOptionReplyAsync()).Type, Is.EqualTo(OptionReplyType.ErrInvalid));
    }

    [TestCase(new string[0], true)]
    [TestCase(new[] { "base:" }, true)]
    [TestCase(new[] { "base:allocation" }, true)]
    [TestCase(new[] { "qemu:dirty-bitmap:x" }, false)]
    public async Task List_meta_context_offers_base_allocation(string[] queries, bool listed)
    {
        await using NbdTestClient client = _server.Connect();
        await client.StartAsync();
        await client.SendOptionAsync(NbdOption.StructuredReply, []);
        await client.ReadOptionReplyAsync();
        await client.SendOptionAsync(NbdOption.ListMetaContext, MetaContextRequest("vol0", queries));
        List<OptionReply> replies = await client.ReadOptionRepliesAsync();
        string[] contexts = [.. replies.Where(r => r.Type == OptionReplyType.MetaContext).Select(r => Encoding.UTF8.GetString(r.Data.AsSpan(4)))];
        Assert.That(contexts, Is.EqualTo(listed ? new[] { "base:allocation" } : Array.Empty<string>()));
        Assert.That(replies[^1].Type, Is.EqualTo(OptionReplyType.Ack));
    }

    [Test]
    public async Task Set_meta_context_for_an_unknown_export_is_ERR_UNKNOWN()
    {
        await using NbdTestClient client = _server.Connect();
        await client.StartAsync();
        await client.SendOptionAsync(NbdOption.StructuredReply, []);
        await client.ReadOptionReplyAsync();
        await client.SendOptionAsync(NbdOption.SetMetaContext, MetaContextRequest("missing", "base:allocation"));
        Assert.That((await client.ReadOptionReplyAsync()).Type, Is.EqualTo(OptionReplyType.ErrUnknown));
    }

    [Test]
    public async Task Meta_context_with_a_truncated_query_is_ERR_INVALID()
    {
        await using NbdTestClient client = _server.Connect();
        await client.StartAsync();
        await client.SendOptionAsync(NbdOption.StructuredReply, []);
        await client.ReadOptionReplyAsync();
        byte[] request = MetaContextRequest("vol0", "base:allocation");
        await client.SendOptionAsync(NbdOption.SetMetaContext, request[..^3]);
        Assert.That((await client.ReadOptionReplyAsync()).Type, Is.EqualTo(OptionReplyType.ErrInvalid));
    }

    [Test]
    public async Task Oversized_option_is_discarded_with_ERR_TOO_BIG_and_the_session_continues()
    {
        await using NbdTestClient client = _server.Connect();
        await client.StartAsync();
        await client.SendOptionAsync(NbdOption.List, new byte[(64 * 1024) + 1]);
        Assert.That((await client.ReadOptionReplyAsync()).Type, Is.EqualTo(OptionReplyType.ErrTooBig));
        await client.SendOptionAsync(NbdOption.List, []);
        Assert.That((await client.ReadOptionRepliesAsync())[^1].Type, Is.EqualTo(OptionReplyType.Ack));
    }

    [Test]
    public async Task Bad_option_magic_closes_the_connection()
    {
        await using NbdTestClient client = _server.Connect();
        await client.StartAsync();
        await client.SendOptionAsync(NbdOption.List, [], magic: 0x1234);
        Assert.That(await client.IsClosedAsync(), Is.True);
    }

    [Test]
    public async Task Read_only_export_advertises_read_only_and_no_write_commands()
    {
        await using NbdTestClient client = _server.Connect();
        (ulong size, TransmissionFlags flags) = await client.ConnectAsync("archive");
        Assert.That(size, Is.EqualTo(1UL << 20));
        Assert.That(flags.HasFlag(TransmissionFlags.ReadOnly), Is.True);
        Assert.That(flags & (TransmissionFlags.SendTrim | TransmissionFlags.SendWriteZeroes), Is.EqualTo((TransmissionFlags)0));
    }

    [Test]
    public async Task Df_is_advertised_only_with_structured_replies()
    {
        await using NbdTestClient simple = _server.Connect();
        (_, TransmissionFlags simpleFlags) = await simple.ConnectAsync();
        await using NbdTestClient structured = _server.Connect();
        (_, TransmissionFlags structuredFlags) = await structured.ConnectAsync(structured: true);
        Assert.That(simpleFlags.HasFlag(TransmissionFlags.SendDf), Is.False);
        Assert.That(structuredFlags.HasFlag(TransmissionFlags.SendDf), Is.True);
    }

    [Test]
    public async Task Options_from_a_non_fixed_newstyle_client_other_than_export_name_close_the_connection()
    {
        await using NbdTestClient client = _server.Connect();
        await client.StartAsync(flags: 0);
        await client.SendOptionAsync(NbdOption.List, []);
        Assert.That(await client.IsClosedAsync(), Is.True);
    }

    [Test]
    public async Task A_client_that_stalls_in_the_handshake_is_disconnected_after_the_timeout()
    {
        await using var server = new TestServer(new FrontendOptions { HandshakeTimeout = TimeSpan.FromMilliseconds(300) });
        await using NbdTestClient client = server.Connect();
        await client.ReadGreetingAsync();
        Assert.That(await client.IsClosedAsync(TimeSpan.FromSeconds(5)), Is.True);
    }
}
