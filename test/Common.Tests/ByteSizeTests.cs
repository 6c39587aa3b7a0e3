using NbdServer.Common.Text;

namespace NbdServer.Common.Tests;

public sealed class ByteSizeTests
{
    [TestCase("4096", 4096L)]
    [TestCase("64K", 65536L)]
    [TestCase("512MiB", 512L << 20)]
    [TestCase("8GiB", 8L << 30)]
    [TestCase("1.5M", 3L << 19)]
    [TestCase(" 2 T ", 2L << 40)]
    public void Parses_sizes_as_operators_write_them(string text, long expected) =>
        Assert.That(ByteSize.Parse(text, "--size"), Is.EqualTo(expected));

    [TestCase("")]
    [TestCase("MiB")]
    [TestCase("12 parsecs")]
    [TestCase("0.3K")]
    [TestCase("99999999999T")]
    public void Rejects_what_is_not_a_size_naming_the_setting(string text) =>
        Assert.That(() => ByteSize.Parse(text, "--size"), Throws.TypeOf<FormatException>().With.Message.StartsWith("--size:"));

    [TestCase(512L, "512 B")]
    [TestCase(4096L, "4 KiB")]
    [TestCase(3L << 30, "3 GiB")]
    public void Formats_exact_binary_units(long bytes, string expected) =>
        Assert.That(ByteSize.Format(bytes), Is.EqualTo(expected));
}
