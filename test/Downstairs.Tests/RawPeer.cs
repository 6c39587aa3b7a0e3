using System.Buffers;
using System.Buffers.Binary;
using System.Net;
using System.Net.Sockets;
using System.Security.Cryptography;
using NbdServer.Protocol;

namespace NbdServer.Downstairs.Tests;

/// <summary>A hand-driven peer: sends whatever frames a test builds, byte for byte, as an attacker would.</summary>
internal sealed class RawPeer(Stream stream) : IAsyncDisposable
{
    public Stream Stream { get; } = stream;

    public static async Task<RawPeer> ConnectAsync(IPEndPoint endpoint)
    {
        var socket = new Socket(endpoint.AddressFamily, SocketType.Stream, ProtocolType.Tcp) { NoDelay = true };
        await socket.ConnectAsync(endpoint);
        return new RawPeer(new NetworkStream(socket, ownsSocket: true));
    }

    public static byte[] Frame(MessageType type, ulong jobId, ReadOnlySpan<byte> body)
    {
        byte[] frame = new byte[Wire.HeaderSize + body.Length];
        FrameReader.WriteHeader(frame, type, ResultCode.Ok, jobId, body.Length);
        body.CopyTo(frame.AsSpan(Wire.HeaderSize));
        return frame;
    }

    public static byte[] HelloBody(ulong generation, bool readOnly, Guid? upstairs = null, Guid? region = null)
    {
        byte[] body = new byte[HelloRequest.BodySize];
        BinaryPrimitives.WriteUInt32LittleEndian(body, Wire.ProtocolVersion);
        BinaryPrimitives.WriteUInt32LittleEndian(body.AsSpan(4), readOnly ? HelloRequest.ReadOnlyFlag : 0);
        (region ?? Guid.Empty).TryWriteBytes(body.AsSpan(8), bigEndian: true, out _);
        (upstairs ?? Guid.NewGuid()).TryWriteBytes(body.AsSpan(24), bigEndian: true, out _);
        Guid.NewGuid().TryWriteBytes(body.AsSpan(40), bigEndian: true, out _);
        BinaryPrimitives.WriteUInt64LittleEndian(body.AsSpan(56), generation);
        return body;
    }

    /// <summary>Block range body (first u64, count u32, reserved) followed by <paramref name="payload"/> bytes of zeroes.</summary>
    public static byte[] RangeBody(ulong first, int count, int payload = 0)
    {
        byte[] body = new byte[BlockRange.FixedSize + payload];
        BinaryPrimitives.WriteUInt64LittleEndian(body, first);
        BinaryPrimitives.WriteInt32LittleEndian(body.AsSpan(8), count);
        return body;
    }

    public async Task SendAsync(byte[] bytes)
    {
        await Stream.WriteAsync(bytes);
        await Stream.FlushAsync();
    }

    public Task SendAsync(MessageType type, ulong jobId, byte[] body) => SendAsync(Frame(type, jobId, body));

    /// <summary>Says Hello and returns the reply's result code.</summary>
    public async Task<ResultCode> HelloAsync(ulong generation, bool readOnly, Guid? upstairs = null)
    {
        await SendAsync(MessageType.Hello, 0, HelloBody(generation, readOnly, upstairs));
        (FrameHeader header, _) = await ReceiveAsync() ?? throw new IOException("closed during Hello");
        return header.Result;
    }

    /// <summary>The next frame, or null when the peer closed the connection.</summary>
    public async Task<(FrameHeader Header, byte[] Body)?> ReceiveAsync()
    {
        byte[] raw = new byte[Wire.HeaderSize];
        if (!await ReadExactlyOrEofAsync(raw))
        {
            return null;
        }
        FrameHeader header = FrameReader.ParseHeader(raw, int.MaxValue);
        byte[] body = new byte[header.BodyLength];
        return await ReadExactlyOrEofAsync(body) ? (header, body) : null;
    }

    /// <summary>True once the peer has closed (reads until end of stream, dropping any frames).</summary>
    public async Task<bool> ClosedByPeerAsync()
    {
        try
        {
            byte[] buffer = new byte[4096];
            while (await Stream.ReadAsync(buffer) > 0)
            {
            }
            return true;
        }
        catch (IOException)
        {
            return true;
        }
    }

    private async Task<bool> ReadExactlyOrEofAsync(byte[] buffer)
    {
        try
        {
            await Stream.ReadExactlyAsync(buffer);
            return true;
        }
        catch (EndOfStreamException)
        {
            return false;
        }
        catch (IOException)
        {
            return false;
        }
    }

    public ValueTask DisposeAsync() => Stream.DisposeAsync();
}

internal static class DiskState
{
    /// <summary>One hash over every file of a region directory (names and contents): equal means nothing on disk changed.</summary>
    public static string Of(string dir)
    {
        using var sha = IncrementalHash.CreateHash(HashAlgorithmName.SHA256);
        foreach (string file in Directory.GetFiles(dir, "*", SearchOption.AllDirectories).Order(StringComparer.Ordinal))
        {
            if (Path.GetFileName(file) == Storage.RegionLayout.LockFileName || file.EndsWith(Storage.RegionLayout.StagingSuffix, StringComparison.Ordinal))
            {
                continue; // the lock is held open exclusively; a staging copy is not the region until committed
            }
            sha.AppendData(System.Text.Encoding.UTF8.GetBytes(Path.GetRelativePath(dir, file)));
            sha.AppendData(File.ReadAllBytes(file));
        }
        return Convert.ToHexString(sha.GetHashAndReset());
    }
}
