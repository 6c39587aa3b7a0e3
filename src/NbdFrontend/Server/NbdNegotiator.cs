using System.Buffers.Binary;
using System.Text;
using Microsoft.Extensions.Logging;
using NbdServer.Common.Logging;
using NbdServer.Common.Tls;
using NbdServer.Common.Volumes;
using NbdServer.Nbd;

namespace NbdServer.Frontend.Server;

/// <summary>What the handshake settled: the export and the reply style of the transmission phase.</summary>
internal sealed record NegotiatedSession(NbdExport Export, TransmissionFlags Flags, bool StructuredReplies, bool BaseAllocation);

/// <summary>
/// The fixed-newstyle handshake and option haggling (proto.md "Handshake"). Options are answered
/// one at a time; malformed ones get <c>NBD_REP_ERR_INVALID</c>, unknown ones <c>NBD_REP_ERR_UNSUP</c>,
/// and only a client that breaks a MUST (bad magic, unknown client flags) is disconnected.
/// TLS (proto.md "TLS support"): with <see cref="TlsMode.Off"/> STARTTLS is refused by policy (NOTLS);
/// <see cref="TlsMode.On"/> accepts it at any point (SELECTIVETLS with no TLS-only export);
/// <see cref="TlsMode.Require"/> answers every other option NBD_REP_ERR_TLS_REQD until TLS is up (FORCEDTLS).
/// </summary>
internal sealed class NbdNegotiator(Transport transport, ExportRegistry exports, FrontendOptions options, long connectionId, ILogger logger, Func<bool> isShuttingDown, TlsServerPolicy? tls = null, LogThrottle? throttle = null)
{
    /// <summary>Option header: IHAVEOPT (64), option (32), data length (32).</summary>
    private const int OptionHeaderSize = 16;

    /// <summary>Option reply header: magic (64), option (32), reply type (32), data length (32).</summary>
    private const int OptionReplyHeaderSize = 20;

    private const int ZeroPaddingSize = 124;

    private bool _fixedNewstyle;
    private bool _noZeroes;
    private bool _structuredReplies;
    private NbdExport? _metaContextExport;
    private bool _baseAllocation;

    /// <summary>Runs the handshake; null when the client aborted or was disconnected.</summary>
    public async Task<NegotiatedSession?> NegotiateAsync(CancellationToken cancellationToken)
    {
        byte[] greeting = new byte[18];
        BinaryPrimitives.WriteUInt64BigEndian(greeting, NbdMagic.InitPassword);
        BinaryPrimitives.WriteUInt64BigEndian(greeting.AsSpan(8), NbdMagic.Option);
        BinaryPrimitives.WriteUInt16BigEndian(greeting.AsSpan(16), (ushort)(HandshakeFlags.FixedNewstyle | HandshakeFlags.NoZeroes));
        await transport.SendAsync(greeting, cancellationToken);

        byte[] clientFlagsBytes = new byte[4];
        if (!await transport.Input.ReadExactlyAsync(clientFlagsBytes, cancellationToken))
        {
            return null;
        }
        var clientFlags = (ClientFlags)BinaryPrimitives.ReadUInt32BigEndian(clientFlagsBytes);
        if ((clientFlags & ~(ClientFlags.FixedNewstyle | ClientFlags.NoZeroes)) != 0)
        {
            // proto.md: "the server MUST drop the TCP connection if the client sets an unknown flag".
            return Drop("unknown client flags", $"flags 0x{(uint)clientFlags:x8}");
        }
        _fixedNewstyle = (clientFlags & ClientFlags.FixedNewstyle) != 0;
        _noZeroes = (clientFlags & ClientFlags.NoZeroes) != 0;

        byte[] header = new byte[OptionHeaderSize];
        for (int count = 0; count < options.MaxOptionsPerHandshake; count++)
        {
            if (!await transport.Input.ReadExactlyAsync(header, cancellationToken))
            {
                return null;
            }
            ulong magic = BinaryPrimitives.ReadUInt64BigEndian(header);
            var option = (NbdOption)BinaryPrimitives.ReadUInt32BigEndian(header.AsSpan(8));
            uint length = BinaryPrimitives.ReadUInt32BigEndian(header.AsSpan(12));
            if (magic != NbdMagic.Option)
            {
                return Drop("bad option magic", $"magic 0x{magic:x16}");
            }
            if (!_fixedNewstyle && option != NbdOption.ExportName)
            {
                return Drop("option from a client that did not ask for fixed newstyle", $"option {(uint)option}");
            }
            if (length > options.MaxOptionBytes)
            {
                if (option == NbdOption.ExportName)
                {
                    return Drop("oversize NBD_OPT_EXPORT_NAME", $"{length} bytes, limit {options.MaxOptionBytes}");
                }
                await transport.Input.SkipAsync(length, cancellationToken);
                await ReplyAsync(option, OptionReplyType.ErrTooBig, $"option data of {length} bytes exceeds the limit of {options.MaxOptionBytes}", cancellationToken);
                continue;
            }
            byte[] data = new byte[length];
            if (length > 0 && !await transport.Input.ReadExactlyAsync(data, cancellationToken))
            {
                return null;
            }
            if (isShuttingDown() && option != NbdOption.Abort)
            {
                if (option == NbdOption.ExportName)
                {
                    return Drop("NBD_OPT_EXPORT_NAME while the server is shutting down");
                }
                await ReplyAsync(option, OptionReplyType.ErrShutdown, "server is shutting down", cancellationToken);
                continue;
            }
            if (options.Tls == TlsMode.Require && transport.Tls is null && option is not (NbdOption.StartTls or NbdOption.Abort))
            {
                if (option == NbdOption.ExportName)
                {
                    // EXPORT_NAME cannot be answered with an error: the spec has the server end the session.
                    return Drop("NBD_OPT_EXPORT_NAME without TLS (tls require)");
                }
                await ReplyAsync(option, OptionReplyType.ErrTlsRequired, "this server requires TLS: send NBD_OPT_STARTTLS first", cancellationToken);
                continue;
            }
            (bool done, NegotiatedSession? session) = await HandleOptionAsync(option, data, cancellationToken);
            if (done)
            {
                return session;
            }
        }
        return Drop("too many options without choosing an export", $"limit {options.MaxOptionsPerHandshake}");
    }

    private async Task<(bool Done, NegotiatedSession? Session)> HandleOptionAsync(NbdOption option, byte[] data, CancellationToken cancellationToken)
    {
        switch (option)
        {
            case NbdOption.ExportName:
                {
                    if (!TryDecodeString(data, out string name) || !exports.TryGet(name, out NbdExport export))
                    {
                        // EXPORT_NAME cannot return an error: the spec requires closing the session.
                        return (true, Drop("unknown export requested with NBD_OPT_EXPORT_NAME", $"export '{Printable(data)}'"));
                    }
                    NegotiatedSession session = Settle(export);
                    byte[] reply = new byte[_noZeroes ? 10 : 10 + ZeroPaddingSize];
                    BinaryPrimitives.WriteUInt64BigEndian(reply, (ulong)export.Volume.Size);
                    BinaryPrimitives.WriteUInt16BigEndian(reply.AsSpan(8), (ushort)session.Flags);
                    await transport.SendAsync(reply, cancellationToken);
                    return (true, session);
                }
            case NbdOption.Abort:
                // The client may already have closed; a failed ACK is not worth an error.
                try
                {
                    await ReplyAsync(option, OptionReplyType.Ack, ReadOnlyMemory<byte>.Empty, cancellationToken);
                }
                catch (IOException)
                {
                }
                return (true, null);
            case NbdOption.List:
                if (data.Length != 0)
                {
                    await ReplyAsync(option, OptionReplyType.ErrInvalid, "NBD_OPT_LIST takes no data", cancellationToken);
                    break;
                }
                foreach (NbdExport export in exports.All)
                {
                    byte[] name = Encoding.UTF8.GetBytes(export.Name);
                    byte[] description = Encoding.UTF8.GetBytes(export.Description);
                    byte[] payload = new byte[4 + name.Length + description.Length];
                    BinaryPrimitives.WriteUInt32BigEndian(payload, (uint)name.Length);
                    name.CopyTo(payload, 4);
                    description.CopyTo(payload, 4 + name.Length);
                    await ReplyAsync(option, OptionReplyType.Server, payload, cancellationToken);
                }
                await ReplyAsync(option, OptionReplyType.Ack, ReadOnlyMemory<byte>.Empty, cancellationToken);
                break;
            case NbdOption.Info:
            case NbdOption.Go:
                {
                    NegotiatedSession? session = await HandleInfoAsync(option, data, cancellationToken);
                    if (option == NbdOption.Go && session is not null)
                    {
                        return (true, session);
                    }
                    break;
                }
            case NbdOption.StructuredReply:
                if (data.Length != 0)
                {
                    await ReplyAsync(option, OptionReplyType.ErrInvalid, "NBD_OPT_STRUCTURED_REPLY takes no data", cancellationToken);
                    break;
                }
                _structuredReplies = true;
                await ReplyAsync(option, OptionReplyType.Ack, ReadOnlyMemory<byte>.Empty, cancellationToken);
                break;
            case NbdOption.ListMetaContext:
            case NbdOption.SetMetaContext:
                await HandleMetaContextAsync(option, data, cancellationToken);
                break;
            case NbdOption.StartTls:
                if (tls is null)
                {
                    await ReplyAsync(option, OptionReplyType.ErrPolicy, "TLS is not enabled on this server", cancellationToken);
                    break;
                }
                if (transport.Tls is not null)
                {
                    await ReplyAsync(option, OptionReplyType.ErrInvalid, "TLS is already active", cancellationToken);
                    break;
                }
                if (data.Length != 0)
                {
                    await ReplyAsync(option, OptionReplyType.ErrInvalid, "NBD_OPT_STARTTLS takes no data", cancellationToken);
                    break;
                }
                if (!await StartTlsAsync(tls, cancellationToken))
                {
                    return (true, null);
                }
                break;
            default:
                await ReplyAsync(option, OptionReplyType.ErrUnsupported, $"option {(uint)option} is not supported", cancellationToken);
                break;
        }
        FrontendLog.OptionHandled(logger, connectionId, option.ToString(), "answered");
        return (false, null);
    }

    /// <summary>
    /// Acknowledges STARTTLS and runs the TLS handshake (within the handshake timeout, which covers
    /// the whole negotiation); false when the connection must end.
    /// </summary>
    private async Task<bool> StartTlsAsync(TlsServerPolicy policy, CancellationToken cancellationToken)
    {
        if (transport.HasUnreadInput())
        {
            // The client must wait for our ACK before its TLS handshake; plaintext bytes already sent
            // after STARTTLS would otherwise be read as if they had come over TLS.
            Drop("data sent after NBD_OPT_STARTTLS without waiting for the reply");
            return false;
        }
        await ReplyAsync(NbdOption.StartTls, OptionReplyType.Ack, ReadOnlyMemory<byte>.Empty, cancellationToken);
        try
        {
            await transport.UpgradeToTlsAsync(policy, options.HandshakeTimeout, cancellationToken);
        }
        catch (TlsHandshakeException e)
        {
            // After the ACK there is no way back to plaintext: the spec has the server end the session.
            Drop("TLS handshake failed", e.Message);
            return false;
        }
        // What was negotiated in plaintext may have been tampered with on the way: start again.
        _structuredReplies = false;
        _baseAllocation = false;
        _metaContextExport = null;
        LogTlsEstablished();
        return true;
    }

    private void LogTlsEstablished()
    {
        if (transport.Tls is { } ssl)
        {
            FrontendLog.TlsEstablished(logger, connectionId, ssl.SslProtocol.ToString(), ssl.RemoteCertificate?.Subject ?? "without a certificate");
        }
    }

    /// <summary>
    /// NBD_OPT_INFO / NBD_OPT_GO: name length (32), name, number of info requests (16), requests (16 each).
    /// Always answers NBD_INFO_EXPORT; name, description and block size when asked. Block sizes are
    /// never required (the kernel's nbd-client asks for none and cannot handle ERR_BLOCK_SIZE_REQD).
    /// </summary>
    private async Task<NegotiatedSession?> HandleInfoAsync(NbdOption option, byte[] data, CancellationToken cancellationToken)
    {
        if (data.Length < 6)
        {
            await ReplyAsync(option, OptionReplyType.ErrInvalid, "option data too short", cancellationToken);
            return null;
        }
        uint nameLength = BinaryPrimitives.ReadUInt32BigEndian(data);
        if (nameLength > data.Length - 6)
        {
            await ReplyAsync(option, OptionReplyType.ErrInvalid, "export name length exceeds option data", cancellationToken);
            return null;
        }
        int requestCount = BinaryPrimitives.ReadUInt16BigEndian(data.AsSpan(4 + (int)nameLength));
        if (data.Length != 6 + nameLength + (2 * requestCount))
        {
            await ReplyAsync(option, OptionReplyType.ErrInvalid, "information request count does not match option length", cancellationToken);
            return null;
        }
        if (!TryDecodeString(data.AsSpan(4, (int)nameLength), out string name))
        {
            await ReplyAsync(option, OptionReplyType.ErrInvalid, "export name is not valid UTF-8 or contains NUL", cancellationToken);
            return null;
        }
        if (!exports.TryGet(name, out NbdExport export))
        {
            await ReplyAsync(option, OptionReplyType.ErrUnknown, $"no export named '{name}'", cancellationToken);
            return null;
        }
        var requested = new HashSet<InfoType>();
        for (int i = 0; i < requestCount; i++)
        {
            requested.Add((InfoType)BinaryPrimitives.ReadUInt16BigEndian(data.AsSpan(6 + (int)nameLength + (2 * i))));
        }

        NegotiatedSession session = Settle(export);
        byte[] info = new byte[12];
        BinaryPrimitives.WriteUInt16BigEndian(info, (ushort)InfoType.Export);
        BinaryPrimitives.WriteUInt64BigEndian(info.AsSpan(2), (ulong)export.Volume.Size);
        BinaryPrimitives.WriteUInt16BigEndian(info.AsSpan(10), (ushort)session.Flags);
        await ReplyAsync(option, OptionReplyType.Info, info, cancellationToken);
        if (requested.Contains(InfoType.Name))
        {
            await ReplyAsync(option, OptionReplyType.Info, InfoString(InfoType.Name, export.Name), cancellationToken);
        }
        if (requested.Contains(InfoType.Description) && export.Description.Length > 0)
        {
            await ReplyAsync(option, OptionReplyType.Info, InfoString(InfoType.Description, export.Description), cancellationToken);
        }
        if (requested.Contains(InfoType.BlockSize))
        {
            byte[] sizes = new byte[14];
            BinaryPrimitives.WriteUInt16BigEndian(sizes, (ushort)InfoType.BlockSize);
            BinaryPrimitives.WriteUInt32BigEndian(sizes.AsSpan(2), (uint)export.Volume.MinimumBlockSize);
            BinaryPrimitives.WriteUInt32BigEndian(sizes.AsSpan(6), (uint)Math.Max(export.Volume.PreferredBlockSize, export.Volume.MinimumBlockSize));
            BinaryPrimitives.WriteUInt32BigEndian(sizes.AsSpan(10), (uint)options.MaxPayloadBytes);
            await ReplyAsync(option, OptionReplyType.Info, sizes, cancellationToken);
        }
        await ReplyAsync(option, OptionReplyType.Ack, ReadOnlyMemory<byte>.Empty, cancellationToken);
        return session;
    }

    /// <summary>
    /// NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT: export name length (32), name, query
    /// count (32), then each query as length (32) + string. We offer one context, base:allocation.
    /// </summary>
    private async Task HandleMetaContextAsync(NbdOption option, byte[] data, CancellationToken cancellationToken)
    {
        if (!_structuredReplies)
        {
            await ReplyAsync(option, OptionReplyType.ErrInvalid, "negotiate NBD_OPT_STRUCTURED_REPLY first", cancellationToken);
            return;
        }
        if (!TryParseMetaContextQuery(data, out string exportName, out List<string> queries))
        {
            await ReplyAsync(option, OptionReplyType.ErrInvalid, "malformed meta context request", cancellationToken);
            return;
        }
        if (!exports.TryGet(exportName, out NbdExport export))
        {
            await ReplyAsync(option, OptionReplyType.ErrUnknown, $"no export named '{exportName}'", cancellationToken);
            return;
        }
        bool blockStatusAvailable = (export.Volume.Features & VolumeFeatures.BlockStatus) != 0;
        bool matches;
        if (option == NbdOption.ListMetaContext)
        {
            // An empty query list means "everything you have"; "base:" means every base: context.
            matches = blockStatusAvailable && (queries.Count == 0 || queries.Exists(q => q is "base:" or MetaContexts.BaseAllocation));
            if (matches)
            {
                await ReplyAsync(option, OptionReplyType.MetaContext, MetaContextPayload(0), cancellationToken);
            }
        }
        else
        {
            matches = blockStatusAvailable && queries.Contains(MetaContexts.BaseAllocation);
            // SET replaces whatever was selected before, even with nothing.
            _baseAllocation = matches;
            _metaContextExport = export;
            if (matches)
            {
                await ReplyAsync(option, OptionReplyType.MetaContext, MetaContextPayload(MetaContexts.BaseAllocationId), cancellationToken);
            }
        }
        await ReplyAsync(option, OptionReplyType.Ack, ReadOnlyMemory<byte>.Empty, cancellationToken);
    }

    private static bool TryParseMetaContextQuery(ReadOnlySpan<byte> data, out string exportName, out List<string> queries)
    {
        exportName = "";
        queries = [];
        if (data.Length < 8)
        {
            return false;
        }
        uint nameLength = BinaryPrimitives.ReadUInt32BigEndian(data);
        if (nameLength > data.Length - 8 || !TryDecodeString(data.Slice(4, (int)nameLength), out exportName))
        {
            return false;
        }
        ReadOnlySpan<byte> rest = data[(4 + (int)nameLength)..];
        uint count = BinaryPrimitives.ReadUInt32BigEndian(rest);
        rest = rest[4..];
        for (uint i = 0; i < count; i++)
        {
            if (rest.Length < 4)
            {
                return false;
            }
            uint length = BinaryPrimitives.ReadUInt32BigEndian(rest);
            if (length > rest.Length - 4 || !TryDecodeString(rest.Slice(4, (int)length), out string query))
            {
                return false;
            }
            queries.Add(query);
            rest = rest[(4 + (int)length)..];
        }
        return rest.IsEmpty;
    }

    private NegotiatedSession Settle(NbdExport export)
    {
        VolumeFeatures features = export.Volume.Features;
        TransmissionFlags flags = TransmissionFlags.HasFlags;
        if ((features & VolumeFeatures.Flush) != 0)
        {
            flags |= TransmissionFlags.SendFlush;
        }
        if ((features & VolumeFeatures.ForceUnitAccess) != 0)
        {
            flags |= TransmissionFlags.SendFua;
        }
        if ((features & VolumeFeatures.Cache) != 0)
        {
            flags |= TransmissionFlags.SendCache;
        }
        if ((features & VolumeFeatures.MultiConnection) != 0)
        {
            flags |= TransmissionFlags.CanMultiConn;
        }
        if (_structuredReplies)
        {
            flags |= TransmissionFlags.SendDf;
        }
        if (export.IsReadOnly)
        {
            flags |= TransmissionFlags.ReadOnly;
        }
        else
        {
            if ((features & VolumeFeatures.Trim) != 0)
            {
                flags |= TransmissionFlags.SendTrim;
            }
            if ((features & VolumeFeatures.WriteZeroes) != 0)
            {
                flags |= TransmissionFlags.SendWriteZeroes;
                if ((features & VolumeFeatures.FastZero) != 0)
                {
                    flags |= TransmissionFlags.SendFastZero;
                }
            }
        }
        // Contexts chosen for another export do not carry over (proto.md, NBD_OPT_SET_META_CONTEXT).
        bool baseAllocation = _baseAllocation && ReferenceEquals(_metaContextExport, export);
        return new NegotiatedSession(export, flags, _structuredReplies, baseAllocation);
    }

    private async ValueTask ReplyAsync(NbdOption option, OptionReplyType type, string message, CancellationToken cancellationToken)
    {
        FrontendLog.OptionHandled(logger, connectionId, option.ToString(), $"{type}: {message}");
        await ReplyAsync(option, type, Encoding.UTF8.GetBytes(message), cancellationToken);
    }

    private async ValueTask ReplyAsync(NbdOption option, OptionReplyType type, ReadOnlyMemory<byte> payload, CancellationToken cancellationToken)
    {
        byte[] reply = new byte[OptionReplyHeaderSize + payload.Length];
        BinaryPrimitives.WriteUInt64BigEndian(reply, NbdMagic.OptionReply);
        BinaryPrimitives.WriteUInt32BigEndian(reply.AsSpan(8), (uint)option);
        BinaryPrimitives.WriteUInt32BigEndian(reply.AsSpan(12), (uint)type);
        BinaryPrimitives.WriteUInt32BigEndian(reply.AsSpan(16), (uint)payload.Length);
        payload.Span.CopyTo(reply.AsSpan(OptionReplyHeaderSize));
        await transport.SendAsync(reply, cancellationToken);
    }

    private static byte[] InfoString(InfoType type, string value)
    {
        byte[] text = Encoding.UTF8.GetBytes(value);
        byte[] payload = new byte[2 + text.Length];
        BinaryPrimitives.WriteUInt16BigEndian(payload, (ushort)type);
        text.CopyTo(payload, 2);
        return payload;
    }

    private static byte[] MetaContextPayload(uint id)
    {
        byte[] name = Encoding.UTF8.GetBytes(MetaContexts.BaseAllocation);
        byte[] payload = new byte[4 + name.Length];
        BinaryPrimitives.WriteUInt32BigEndian(payload, id);
        name.CopyTo(payload, 4);
        return payload;
    }

    private static readonly UTF8Encoding StrictUtf8 = new(encoderShouldEmitUTF8Identifier: false, throwOnInvalidBytes: true);

    /// <summary>NBD strings are UTF-8 without NUL, at most 4096 bytes.</summary>
    private static bool TryDecodeString(ReadOnlySpan<byte> bytes, out string value)
    {
        value = "";
        if (bytes.Length > 4096 || bytes.Contains((byte)0))
        {
            return false;
        }
        try
        {
            value = StrictUtf8.GetString(bytes);
            return true;
        }
        catch (ArgumentException)
        {
            return false;
        }
    }

    private static string Printable(ReadOnlySpan<byte> bytes)
    {
        string text = Encoding.UTF8.GetString(bytes[..Math.Min(bytes.Length, 64)]);
        return new string([.. text.Select(c => char.IsControl(c) ? '?' : c)]);
    }

    /// <summary>
    /// Drops the client. Every drop goes through the throttle keyed by its kind, never by a value the
    /// peer chose (flags, magic, names), so a scanner or a thousand strangers sending garbage are a
    /// first line with details and then a count, not a line per connection.
    /// </summary>
    private NegotiatedSession? Drop(string kind, string detail = "")
    {
        string remote = transport.RemoteEndPoint;
        if (throttle is null)
        {
            FrontendLog.ProtocolViolation(logger, connectionId, remote, detail.Length == 0 ? kind : $"{kind} ({detail})");
            return null;
        }
        throttle.Report(LogLevel.Warning, $"NBD client dropped during the handshake: {kind}", () => $"first: connection {connectionId} from {remote}{(detail.Length == 0 ? "" : $", {detail}")}");
        return null;
    }
}
