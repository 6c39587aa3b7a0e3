namespace NbdServer.Common.Tls;

/// <summary>
/// What an <see cref="System.Net.Security.SslStream"/> reads from and writes to, instead of the
/// socket's stream directly: it reads ahead in large chunks, and (once told to) holds writes until
/// the next flush.
/// </summary>
/// <remarks>
/// SslStream works one TLS record (at most 16 KiB of data) at a time: each record is one write to
/// the stream below, and reading one takes one or two reads. Straight on a socket that is a send
/// or receive system call per 16 KiB — 64 for every MiB of a large write, three times over for
/// three replicas. Reading ahead and writing a whole batch of records at once brings that back to
/// roughly what a plaintext link costs. Reads and writes keep separate state, so one reader and one
/// writer may run at the same time (SslStream allows exactly that). Writes are held only after
/// <see cref="CoalesceWrites"/>, set once the handshake is done, and only for a writer that flushes
/// at the end of each batch, as the downstairs link's frame sender does.
/// </remarks>
internal sealed class TlsTransportStream(Stream inner, int bufferBytes) : Stream
{
    private readonly byte[] _readBuffer = new byte[bufferBytes];
    private readonly byte[] _writeBuffer = new byte[bufferBytes];
    private int _readStart;
    private int _readEnd;
    private int _written;

    /// <summary>Hold writes until <see cref="FlushAsync(CancellationToken)"/>; set after the handshake.</summary>
    public bool CoalesceWrites { get; set; }

    public override bool CanRead => true;

    public override bool CanWrite => true;

    public override bool CanSeek => false;

    public override long Length => throw new NotSupportedException();

    public override long Position { get => throw new NotSupportedException(); set => throw new NotSupportedException(); }

    public override async ValueTask<int> ReadAsync(Memory<byte> buffer, CancellationToken cancellationToken = default)
    {
        if (_readStart == _readEnd)
        {
            if (buffer.Length >= _readBuffer.Length)
            {
                return await inner.ReadAsync(buffer, cancellationToken).ConfigureAwait(false);
            }
            int n = await inner.ReadAsync(_readBuffer, cancellationToken).ConfigureAwait(false);
            if (n == 0)
            {
                return 0;
            }
            _readStart = 0;
            _readEnd = n;
        }
        return TakeBuffered(buffer.Span);
    }

    public override int Read(byte[] buffer, int offset, int count) => Read(buffer.AsSpan(offset, count));

    public override int Read(Span<byte> buffer)
    {
        if (_readStart == _readEnd)
        {
            if (buffer.Length >= _readBuffer.Length)
            {
                return inner.Read(buffer);
            }
            int n = inner.Read(_readBuffer);
            if (n == 0)
            {
                return 0;
            }
            _readStart = 0;
            _readEnd = n;
        }
        return TakeBuffered(buffer);
    }

    public override Task<int> ReadAsync(byte[] buffer, int offset, int count, CancellationToken cancellationToken) =>
        ReadAsync(buffer.AsMemory(offset, count), cancellationToken).AsTask();

    public override async ValueTask WriteAsync(ReadOnlyMemory<byte> buffer, CancellationToken cancellationToken = default)
    {
        if (!CoalesceWrites)
        {
            await inner.WriteAsync(buffer, cancellationToken).ConfigureAwait(false);
            return;
        }
        if (_written > 0 && _written + buffer.Length > _writeBuffer.Length)
        {
            await FlushBufferAsync(cancellationToken).ConfigureAwait(false);
        }
        if (buffer.Length >= _writeBuffer.Length)
        {
            await inner.WriteAsync(buffer, cancellationToken).ConfigureAwait(false);
            return;
        }
        buffer.Span.CopyTo(_writeBuffer.AsSpan(_written));
        _written += buffer.Length;
    }

    public override Task WriteAsync(byte[] buffer, int offset, int count, CancellationToken cancellationToken) =>
        WriteAsync(buffer.AsMemory(offset, count), cancellationToken).AsTask();

    public override void Write(byte[] buffer, int offset, int count) => Write(buffer.AsSpan(offset, count));

    public override void Write(ReadOnlySpan<byte> buffer)
    {
        if (_written > 0)
        {
            inner.Write(_writeBuffer, 0, _written);
            _written = 0;
        }
        inner.Write(buffer);
    }

    public override async Task FlushAsync(CancellationToken cancellationToken)
    {
        await FlushBufferAsync(cancellationToken).ConfigureAwait(false);
        await inner.FlushAsync(cancellationToken).ConfigureAwait(false);
    }

    public override void Flush()
    {
        if (_written > 0)
        {
            inner.Write(_writeBuffer, 0, _written);
            _written = 0;
        }
        inner.Flush();
    }

    public override long Seek(long offset, SeekOrigin origin) => throw new NotSupportedException();

    public override void SetLength(long value) => throw new NotSupportedException();

    protected override void Dispose(bool disposing)
    {
        if (disposing)
        {
            inner.Dispose();
        }
        base.Dispose(disposing);
    }

    public override async ValueTask DisposeAsync()
    {
        await inner.DisposeAsync().ConfigureAwait(false);
        await base.DisposeAsync().ConfigureAwait(false);
    }

    private int TakeBuffered(Span<byte> destination)
    {
        int n = Math.Min(destination.Length, _readEnd - _readStart);
        _readBuffer.AsSpan(_readStart, n).CopyTo(destination);
        _readStart += n;
        return n;
    }

    private async ValueTask FlushBufferAsync(CancellationToken cancellationToken)
    {
        if (_written > 0)
        {
            int n = _written;
            _written = 0;
            await inner.WriteAsync(_writeBuffer.AsMemory(0, n), cancellationToken).ConfigureAwait(false);
        }
    }
}
